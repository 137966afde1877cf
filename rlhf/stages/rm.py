"""Reward model: a sequence classifier with one output, trained with TRL's RewardTrainer on
preference pairs by the Bradley-Terry loss -log sigmoid(r(x, y_w) - r(x, y_l)) (Ouyang et
al. 2022, eq. 1). Under LoRA the score head trains in full and is saved with the adapter.

metrics.json reports eval_accuracy (share of held-out pairs scored chosen > rejected),
eval_margin (mean r(x, y_w) - r(x, y_l)), and eval_win_rate / eval_kendall_tau (`rlhf.metrics`).
"""

from rlhf.lifecycle import fit, load_inputs, trainer_kwargs
from rlhf.reward_trainer import RankingRewardTrainer


def run(context) -> dict:
    inputs = load_inputs(context, data_kind="preference", head="reward")
    trainer = RankingRewardTrainer(**trainer_kwargs(context, context.cfg.rm, inputs))
    return fit(trainer, context, inputs)
