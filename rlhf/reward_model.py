"""Reward models as the stages use them: a finished `stage=rm` run loaded frozen, exactly as it
computed when its accuracy was measured (`load_reward_model`), and its scores of (prompt,
response) rows read where it was trained to read them (`RewardModel.scores`).

Score where the reward model was trained to. A sequence classifier reads its score at the last
token that is not `config.pad_token_id`, which `rlhf.models.load_model` sets to the id the
tokenizer pads with: that is where TRL's reward trainer pools. `RewardModel.scores` pools by the
same rule - each row's last attended token that is not the tokenizer's pad id - from the
attention mask and the ids, so that a config naming another pad id cannot move it onto padding.
Where the tokenizer pads with EOS (a model shipped without a pad token) and the chat template
ends in EOS, both read the token before that EOS.
"""

import json
from dataclasses import dataclass

import torch

from rlhf.lineage import TrainedRun


@dataclass
class RewardModel:
    """A frozen reward model, its own tokenizer (and chat template), and the longest input it
    was trained on: longer (prompt, response) rows are cut to it from the left - the oldest
    prompt tokens go first, the response is kept - as the RM never saw longer ones."""

    model: object
    tokenizer: object
    max_length: int
    cut_inputs: int = 0  # rows cut to max_length so far (metrics report it)
    identity: str = ""  # the weights, precision and max_length its scores depend on (keys cached scores)

    @torch.no_grad()
    def scores(self, prompts: list, responses: list, device) -> torch.Tensor:
        """The score of each (prompt, response), templated with the RM's tokenizer and read where
        the RM was trained to read it (`scores_at_last_token`)."""
        texts = [
            self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
            for messages, response in zip(prompts, responses)
        ]
        rows = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]  # verbose: cut below, not warned about
        self.cut_inputs += sum(len(row) > self.max_length for row in rows)
        batch = self.tokenizer.pad({"input_ids": [row[-self.max_length :] for row in rows]}, return_tensors="pt").to(device)
        return scores_at_last_token(self.model, batch["input_ids"], batch["attention_mask"], self.tokenizer.pad_token_id)

    def batched_scores(self, prompts: list, responses: list, device, batch_size: int) -> list:
        """`scores`, `batch_size` rows at a time, as a list."""
        scores = []
        for start in range(0, len(prompts), batch_size):
            batch = slice(start, start + batch_size)
            scores += self.scores(prompts[batch], responses[batch], device).tolist()
        return scores


def scores_at_last_token(reward_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """The score head's output ([batch], float32) at each row's last attended position that does
    not hold `pad_token_id`, the id the tokenizer pads with: where the classifier pools in training
    (its config's pad id is the tokenizer's there), read from the head's output per position, so
    that a config naming another pad id cannot move it."""
    head = getattr(reward_model, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise TypeError(f"{type(reward_model).__name__} has no `score` head: not a transformers sequence classifier")
    per_position = []
    hook = head.register_forward_hook(lambda module, inputs, output: per_position.append(output))
    try:
        reward_model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        hook.remove()
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    readable = attention_mask.bool() & (input_ids != pad_token_id)  # a trailing EOS that is also the pad id is skipped, as in training
    last = (positions * readable).argmax(dim=1)  # the rightmost such position, left or right padding
    return per_position[0][torch.arange(len(last), device=last.device), last, 0].float()


def load_reward_model(run: TrainedRun, context) -> RewardModel:
    """The reward model of a finished `stage=rm` run (the run context opened and checked it): its
    lineage with its own adapter (score head included) on top - merged where that is exact, over
    the quantized base where it trained on one: as the RM computed when its accuracy was measured -
    frozen, with its tokenizer and the run's rm.max_length."""
    model = run.load(context.cfg.hardware, run.quantization, head="reward", merge=True)
    model.requires_grad_(False)
    tokenizer = run.start.tokenizer()
    max_length = run.input_length(tokenizer)
    return RewardModel(model.eval(), tokenizer, max_length=max_length, identity=reward_model_identity(run, context.precision, tokenizer))


def reward_model_identity(run: TrainedRun, precision: str, tokenizer=None) -> str:
    """What a reward model's scores depend on, without loading it: its weights by content (the
    lineage with its own adapter), the precision it computes in and the length it cuts inputs to."""
    return json.dumps([run.lineage.identity(precision, run.quantization), run.input_length(tokenizer)])
