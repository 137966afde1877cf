"""The PPO loop for RLHF (Ouyang et al. 2022; Huang et al. 2024), one update at a time:

    1. rollout   sample a response for each prompt of a batch from the current policy
    2. score     the reward model rates each (prompt, response); a missing EOS costs a penalty
    3. evaluate  log-probs under the policy and the reference, values from the value head
    4. rewards   per-token -kl_coef * (log pi - log ref), plus the score at the last token
    5. GAE       advantages and value targets, advantages whitened
    6. optimise  ppo_epochs passes over shuffled mini-batches of the clipped policy and value
                 losses, gradient clipping; then the KL controller adapts kl_coef

The math lives in `rlhf.ppo.core`; this module moves tensors between the models.
"""

import math
import random
from dataclasses import dataclass

import torch
from torch import nn

from rlhf.ppo import core


@dataclass
class PPOConfig:
    """Settings of `stage=ppo` (conf/stage/ppo.yaml documents each key)."""

    reward_model: str | None = None
    total_updates: int = 40
    batch_size: int = 32
    mini_batch_size: int = 8
    ppo_epochs: int = 4
    learning_rate: float = 1e-3
    max_grad_norm: float = 1.0
    max_prompt_length: int = 128
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    missing_eos_penalty: float | None = 1.0
    kl_coef: float = 0.1
    adaptive_kl: bool = True
    target: float = 6.0
    horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    logging_steps: int = 1

    def __post_init__(self):
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"ppo.batch_size={self.batch_size} must be a multiple of ppo.mini_batch_size={self.mini_batch_size}")


class ValueHead(nn.Module):
    """A scalar value per position, read from the policy's last hidden state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        # Small random weights, zero bias (Huang et al. 2024: heads start near 0 so early
        # value errors do not swamp the policy gradient).
        nn.init.normal_(self.linear.weight, std=1 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)


@dataclass
class Rollout:
    """One batch of sampled responses and everything PPO needs about them ([B, R] per token)."""

    sequences: torch.Tensor  # prompt (left-padded) + response (right-padded), [B, P + R]
    attention_mask: torch.Tensor  # 1 on real prompt and response tokens
    response_mask: torch.Tensor  # 1 on response tokens up to and including EOS, [B, R]
    logprobs: torch.Tensor  # log pi_old(token) at sampling time
    ref_logprobs: torch.Tensor  # log pi_ref(token)
    values: torch.Tensor  # V_old(state before token)
    entropy: torch.Tensor  # policy entropy per token
    scores: torch.Tensor  # reward-model score of each response, [B]
    responses: list  # the decoded responses, for logging and evaluation


class PPOTrainer:
    def __init__(self, policy, ref_policy, value_head, tokenizer, reward_model, reward_tokenizer, settings: PPOConfig, device, log):
        """`ref_policy=None` means the policy is a peft model whose disabled adapter is the
        reference; `log(record)` receives one dict of metrics per logged update."""
        self.policy, self.ref_policy, self.value_head = policy, ref_policy, value_head
        self.tokenizer, self.reward_model, self.reward_tokenizer = tokenizer, reward_model, reward_tokenizer
        self.settings, self.device, self.log = settings, device, log
        trainable = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
        self.optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate)
        self.trainable = trainable
        if settings.adaptive_kl:
            self.kl_controller = core.AdaptiveKLController(settings.kl_coef, settings.target, settings.horizon)
        else:
            self.kl_controller = core.FixedKLController(settings.kl_coef)
        self.policy.eval()  # no dropout: log-probs at sampling and at update time must agree

    # ---- the loop ----------------------------------------------------------------------

    def train(self, prompts: list, seed: int) -> dict:
        """Run `total_updates` PPO updates over batches drawn from `prompts` (message lists)."""
        order, last = random.Random(seed), {}
        batches = self._batches(prompts, order)
        for update in range(1, self.settings.total_updates + 1):
            rollout = self.rollout(next(batches))
            rewards, kl = core.kl_penalized_rewards(
                self._penalised(rollout), rollout.logprobs, rollout.ref_logprobs, rollout.response_mask, self.kl_controller.value
            )
            advantages, returns = core.gae(rewards, rollout.values, rollout.response_mask, self.settings.gamma, self.settings.lam)
            advantages = core.masked_whiten(advantages, rollout.response_mask)
            stats = self.optimise(rollout, advantages, returns)
            mean_kl = kl.sum(dim=1).mean().item()  # KL of whole responses, averaged over the batch
            record = {
                "step": update,
                "objective/scores": rollout.scores.mean().item(),
                "objective/kl": mean_kl,
                "objective/rlhf_reward": (rollout.scores - self.kl_controller.value * kl.sum(dim=1)).mean().item(),
                "objective/entropy": core.masked_mean(rollout.entropy, rollout.response_mask).item(),
                "objective/kl_coef": self.kl_controller.value,
                **stats,
                "response_length": rollout.response_mask.sum(dim=1).float().mean().item(),
            }
            self.kl_controller.update(mean_kl, self.settings.batch_size)
            if update % self.settings.logging_steps == 0 or update == self.settings.total_updates:
                self.log(record)
            last = record
        return {key: value for key, value in last.items() if key != "step"}

    def _batches(self, prompts: list, order: random.Random):
        """Endless batches of prompts: reshuffled passes over the dataset."""
        while True:
            shuffled = prompts[:]
            order.shuffle(shuffled)
            for start in range(0, len(shuffled) - self.settings.batch_size + 1, self.settings.batch_size):
                yield shuffled[start : start + self.settings.batch_size]

    def _penalised(self, rollout: Rollout) -> torch.Tensor:
        if self.settings.missing_eos_penalty is None:
            return rollout.scores
        ended = (rollout.sequences[:, -rollout.response_mask.shape[1]:] == self.tokenizer.eos_token_id).any(dim=1)
        return core.missing_eos_penalty(rollout.scores, ended, self.settings.missing_eos_penalty)

    # ---- 1-3: rollout, scoring, evaluation ---------------------------------------------

    @torch.no_grad()
    def rollout(self, prompts: list) -> Rollout:
        encoded = self._encode_prompts(prompts)
        prompt_length = encoded["input_ids"].shape[1]
        sequences = self.policy.generate(
            **encoded,
            do_sample=True,
            temperature=self.settings.temperature,
            top_p=self.settings.top_p,
            max_new_tokens=self.settings.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        responses = sequences[:, prompt_length:]
        response_mask = self._up_to_first_eos(responses)
        attention_mask = torch.cat([encoded["attention_mask"], response_mask.long()], dim=1)
        logits, values = self.forward(sequences, attention_mask, prompt_length)
        if self.ref_policy is None:
            with self.policy.disable_adapter():  # the reference: the policy without its adapter
                ref_logits, _ = self.forward(sequences, attention_mask, prompt_length, with_values=False)
        else:
            ref_logits, _ = self.forward(sequences, attention_mask, prompt_length, with_values=False, model=self.ref_policy)
        texts = [
            self.tokenizer.decode(row[mask.bool()], skip_special_tokens=True) for row, mask in zip(responses, response_mask)
        ]
        return Rollout(
            sequences=sequences,
            attention_mask=attention_mask,
            response_mask=response_mask,
            logprobs=core.logprobs_from_logits(logits, responses),
            ref_logprobs=core.logprobs_from_logits(ref_logits, responses),
            values=values,
            entropy=core.entropy_from_logits(logits),
            scores=self.score(prompts, texts),
            responses=texts,
        )

    def _encode_prompts(self, prompts: list) -> dict:
        """Chat-templated prompts, left-padded (generation appends on the right), cut to
        max_prompt_length from the left (the end of a prompt matters most)."""
        ids = [
            self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)[
                -self.settings.max_prompt_length:
            ]
            for messages in prompts
        ]
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention_mask[i, width - len(row):] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}

    def _up_to_first_eos(self, responses: torch.Tensor) -> torch.Tensor:
        """1 on each response's tokens up to and including its first EOS, 0 after."""
        is_eos = responses == self.tokenizer.eos_token_id
        after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
        mask = (~after_eos).float()
        mask[:, 0] = 1.0  # a response has at least one token
        return mask

    def forward(self, sequences, attention_mask, prompt_length, with_values: bool = True, model=None):
        """Logits (temperature-scaled, as sampled) and values at the positions that predict
        the response tokens: position t-1 predicts token t."""
        model = model or self.policy
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding shifts positions
        output = model(
            input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=with_values
        )
        predicting = slice(prompt_length - 1, sequences.shape[1] - 1)
        logits = output.logits[:, predicting].float() / self.settings.temperature
        values = self.value_head(output.hidden_states[-1][:, predicting].float()) if with_values else None
        return logits, values

    @torch.no_grad()
    def score(self, prompts: list, responses: list) -> torch.Tensor:
        """The reward model's score of each (prompt, response), templated with its own tokenizer."""
        texts = [
            self.reward_tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
            for messages, response in zip(prompts, responses)
        ]
        batch = self.reward_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        return self.reward_model(**batch).logits[:, 0].float()

    # ---- 6: optimisation -----------------------------------------------------------------

    def optimise(self, rollout: Rollout, advantages, returns) -> dict:
        """ppo_epochs passes over shuffled mini-batches; returns the mean losses and statistics."""
        prompt_length = rollout.sequences.shape[1] - rollout.response_mask.shape[1]
        totals, count = {}, 0
        for _ in range(self.settings.ppo_epochs):
            for index in torch.randperm(self.settings.batch_size).split(self.settings.mini_batch_size):
                mask = rollout.response_mask[index]
                logits, values = self.forward(rollout.sequences[index], rollout.attention_mask[index], prompt_length)
                logprobs = core.logprobs_from_logits(logits, rollout.sequences[index, prompt_length:])
                pg_loss, pg_stats = core.policy_loss(logprobs, rollout.logprobs[index], advantages[index], mask, self.settings.cliprange)
                vf_loss, vf_stats = core.value_loss(
                    values, rollout.values[index], returns[index], mask, self.settings.cliprange_value
                )
                loss = pg_loss + self.settings.vf_coef * vf_loss
                self.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.trainable, self.settings.max_grad_norm)
                self.optimizer.step()
                step = {
                    "loss/policy": pg_loss.item(),
                    "loss/value": vf_loss.item(),
                    "policy/clipfrac": pg_stats["clipfrac"].item(),
                    "policy/approxkl": pg_stats["approxkl"].item(),
                    "value/clipfrac": vf_stats["clipfrac"].item(),
                }
                totals = {key: totals.get(key, 0.0) + value for key, value in step.items()}
                count += 1
        return {key: value / count for key, value in totals.items()}

    # ---- evaluation ------------------------------------------------------------------------

    @torch.no_grad()
    def mean_score(self, prompts: list) -> float:
        """Mean reward-model score of sampled responses to `prompts` (e.g. held-out ones)."""
        scores = [self.rollout(prompts[i : i + self.settings.batch_size]).scores for i in range(0, len(prompts), self.settings.batch_size)]
        return torch.cat(scores).mean().item()
