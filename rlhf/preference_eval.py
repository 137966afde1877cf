"""Every evaluation of a preference model - a DPO policy (its implicit reward) or a reward model -
also reports win_rate and kendall_tau over the held-out pairs (`rlhf.metrics`), beside the
library's own metrics: a mixin for trainers whose batches are [chosen rows; rejected rows].
"""

import json

import torch

from rlhf.compat import prepare_inputs
from rlhf.metrics import preference_metrics


class PreferenceEvaluation:
    """Mixin for trainers whose batches are [chosen rows; rejected rows]: after the library's
    own evaluation, score every held-out pair once more and add the preference metrics."""

    def pair_scores(self, model, batch) -> tuple:
        """(chosen scores, rejected scores) of one collated batch."""
        raise NotImplementedError

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        model = self.accelerator.unwrap_model(self.model)
        chosen, rejected = [], []
        with torch.no_grad():
            for batch in dataloader:
                scores = self.pair_scores(model, prepare_inputs(self, batch))
                # Under DDP each rank scores its shard: gather them, in dataset order.
                batch_chosen, batch_rejected = self.accelerator.gather_for_metrics(scores)
                chosen += batch_chosen.float().tolist()
                rejected += batch_rejected.float().tolist()
        for name, value in preference_metrics(chosen, rejected, self._prompt_keys(len(chosen))).items():
            output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output

    def _prompt_keys(self, count: int) -> list:
        """One key per evaluated pair, equal for pairs of the same prompt (the eval loader keeps
        the dataset's order); without prompts each pair stands alone."""
        dataset = self.eval_dataset
        if hasattr(dataset, "column_names") and "prompt" in dataset.column_names and len(dataset) == count:
            return [json.dumps(prompt, ensure_ascii=False, sort_keys=True) for prompt in dataset["prompt"]]
        return list(range(count))
