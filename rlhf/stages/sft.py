"""Supervised fine-tuning: teach the model to answer like the data, with TRL's SFTTrainer.

Rows become prompt/completion conversations; the trainer applies the chat template and
(`sft.completion_only_loss`) counts only the answer tokens in the loss.
"""

from trl import SFTTrainer

from rlhf.lifecycle import fit, load_inputs, trainer_kwargs


def run(context) -> dict:
    inputs = load_inputs(context, data_kind="sft")
    trainer = SFTTrainer(
        **trainer_kwargs(context, context.cfg.sft, inputs),
    )
    return fit(trainer, context, inputs)
