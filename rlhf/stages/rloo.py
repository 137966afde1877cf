"""REINFORCE Leave-One-Out (Ahmadian et al. 2024): each answer's advantage is its reward minus
the mean reward of the other answers sampled for the same prompt,
with TRL's RLOOTrainer; rewards, reference and held-out scores as `rlhf.online` describes.

    python train.py stage=rloo model.init_from=<sft run> rloo.reward_model=<rm run>
"""

from trl import RLOOTrainer

from rlhf import online


def run(context) -> dict:
    return online.run(context, RLOOTrainer)
