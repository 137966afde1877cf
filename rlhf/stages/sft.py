"""Supervised fine-tuning: teach the model to answer like the data, with TRL's SFTTrainer.

Rows become prompt/completion conversations; the trainer applies the chat template and
(`sft.completion_only_loss`) counts only the answer tokens in the loss.
"""

from pathlib import Path

from trl import SFTTrainer

from rlhf.lifecycle import fit, load_inputs, trainer_kwargs


def run(cfg, run_dir: Path) -> dict:
    inputs = load_inputs(cfg, data_kind="sft")
    trainer = SFTTrainer(
        **trainer_kwargs(cfg, cfg.sft, inputs, run_dir),
    )
    return fit(trainer, run_dir, inputs, cfg)
