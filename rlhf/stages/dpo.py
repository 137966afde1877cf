"""Direct Preference Optimization (Rafailov et al. 2023) with TRL's DPOTrainer.

The loss pushes up the policy's log-ratio to the reference on chosen answers against rejected
ones: -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]),
plus, with `dpo.kl_coef` > 0, an explicit KL(policy || reference) penalty on the chosen
answers (`rlhf.dpo_trainer.KLDPOTrainer`). Under LoRA the reference is the same network with its
adapter disabled (no second copy in memory); with `peft=none` TRL keeps a frozen copy of the
starting weights. Evaluations add win_rate, kendall_tau and margin of the implicit reward.
"""

from rlhf.dpo_trainer import KLDPOTrainer
from rlhf.lifecycle import fit, load_inputs, trainer_kwargs


def run(context) -> dict:
    inputs = load_inputs(context, data_kind="preference")
    trainer = KLDPOTrainer(
        ref_model=None,  # LoRA: the adapter-disabled policy; full fine-tuning: TRL copies the start model
        reference_identity=inputs.lineage.identity(context.precision, context.cfg.quantization),  # keys the reference log-prob cache
        **trainer_kwargs(context, context.cfg.dpo, inputs),
    )
    return fit(trainer, context, inputs)
