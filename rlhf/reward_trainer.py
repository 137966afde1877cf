"""The reward model's trainer: TRL's RewardTrainer with the preference metrics at every evaluation."""

from trl import RewardTrainer

from rlhf.compat import score_head_in_hidden_dtype
from rlhf.preference_eval import PreferenceEvaluation


class RankingRewardTrainer(PreferenceEvaluation, RewardTrainer):
    """TRL's RewardTrainer; each pair's scores are the reward model's outputs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        score_head_in_hidden_dtype(self.model)

    def pair_scores(self, model, batch):
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[:, 0]
        return scores.chunk(2)
