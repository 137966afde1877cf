"""Group Relative Policy Optimization (Shao et al. 2024): each answer's advantage is its reward
against the mean (and spread) of the other answers sampled for the same prompt,
with TRL's GRPOTrainer; rewards, reference and held-out scores as `rlhf.online` describes.

    python train.py stage=grpo model.init_from=<sft run> grpo.reward_model=<rm run>
"""

from trl import GRPOTrainer

from rlhf import online


def run(context) -> dict:
    return online.run(context, GRPOTrainer)
