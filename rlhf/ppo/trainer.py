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

import contextlib
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlhf import distributed, preemption
from rlhf.errors import NonFiniteLoss, UserError
from rlhf.generation import (
    Samples,
    as_reference,
    entropy_from_logits,
    held_out_scores,
    logprobs_from_logits,
    response_logprobs,
    response_outputs,
    sample,
)
from rlhf.ppo import core
from rlhf.ppo.settings import PPOConfig, say_if_the_kl_controller_cannot_move  # PPOConfig: also the _target_ name configs saved before used
from rlhf.reward_model import RewardModel
from rlhf.runs import CHECKPOINT_MARK, checkpoint_step, is_main_process, write_json


class ValueHead(nn.Module):
    """A scalar value per position, read from the policy's last hidden state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        # Exactly 0 at the start, so the first advantages come from the rewards alone: a random
        # head reads values from the large last hidden state whose noise dwarfs the spread of
        # reward-model scores and swamps the policy gradient. The weight still gets a gradient.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # In float32 whatever the autocast: the values feed GAE's recursion and are the value loss's
        # targets; under bfloat16 autocast a Linear returns bfloat16 (8 bits of mantissa).
        with torch.autocast(hidden.device.type, enabled=False):
            return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


@dataclass
class PPOModels:
    """The networks PPO works with, by role."""

    policy: nn.Module  # the causal LM being trained (a peft model under LoRA)
    reference: nn.Module | None  # the frozen starting policy; None: the policy with its adapter disabled
    value_head: ValueHead  # V(state), read from the policy's last hidden state
    tokenizer: object  # the policy's
    reward: RewardModel  # a frozen sequence classifier with its own tokenizer: one score per (prompt, response)


@dataclass
class Rollout:
    """One batch of sampled responses and everything PPO needs about them ([B, R] per token)."""

    samples: Samples  # the sequences, masks and decoded responses
    logprobs: torch.Tensor  # log pi_old(token) at sampling time
    ref_logprobs: torch.Tensor  # log pi_ref(token)
    values: torch.Tensor  # V_old(state before token)
    entropy: torch.Tensor  # policy entropy per token
    scores: torch.Tensor  # reward-model score of each response, [B]


def reward_scores(scores: torch.Tensor, ended_with_eos: torch.Tensor, settings: PPOConfig) -> torch.Tensor:
    """The scores PPO's rewards are built from: the reward model's, less `missing_eos_penalty`
    (in the RM's units) for each response cut before EOS, then - with `whiten_scores` - shifted and
    scaled to mean 0, std 1 over the global batch. Whitened, kl_coef weighs nats against one
    standard deviation of score whatever the RM's scale (a LoRA RM trained 25 steps on SmolLM2 gave
    held-out answers scores of sd 0.38; another RM's may be 10 or 0.01)."""
    if settings.missing_eos_penalty is not None:
        scores = core.missing_eos_penalty(scores, ended_with_eos, settings.missing_eos_penalty)
    if settings.whiten_scores:
        scores = core.masked_whiten(scores[None], torch.ones_like(scores[None]), reduce=distributed.all_sum)[0]
    return scores


def rollout_statistics(rollout: Rollout, kl: torch.Tensor, rewards: torch.Tensor) -> dict:
    """Means over the global batch: per response (the reward model's scores, the KL of whole
    responses, the return PPO maximised, lengths) and per token (entropy), from sums and counts
    added up over the processes. `objective/rlhf_reward` is the sum of the per-token `rewards` the
    advantages were computed from: the score PPO was given (after missing_eos_penalty and, with
    whiten_scores, whitened over the batch, so its mean is then 0) less kl_coef x KL;
    `objective/scores` is the reward model's own score, in its units."""
    mask = rollout.samples.response_mask
    response_kl = kl.sum(dim=1)
    sums = {
        "objective/scores": rollout.scores.sum(),
        "objective/kl": response_kl.sum(),
        "objective/rlhf_reward": rewards.sum(),  # 0 on padding: one return per response, summed
        "response_length": mask.sum(),
    }
    entropy = torch.where(mask.bool(), rollout.entropy, torch.zeros_like(rollout.entropy)).sum()  # over real tokens
    counts = [mask.sum(), mask.new_tensor(len(rollout.scores))]  # tokens, responses (on the rollout's device)
    totals = distributed.all_sum(torch.stack([value.double() for value in (*sums.values(), entropy, *counts)]))
    *summed, entropy, tokens, responses = totals.tolist()
    return {**{name: value / responses for name, value in zip(sums, summed)}, "objective/entropy": entropy / tokens}


class PPOTrainer:
    def __init__(self, models: PPOModels, settings: PPOConfig, device, log):
        """`log(record)` receives one dict of metrics per logged update."""
        self.policy, self.ref_policy, self.value_head = models.policy, models.reference, models.value_head
        self.tokenizer, self.reward = models.tokenizer, models.reward
        self.settings, self.device, self.log = settings, device, log
        trainable = [p for p in self.policy.parameters() if p.requires_grad] + list(self.value_head.parameters())
        self.optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate)
        self.trainable = trainable
        self.kl_controller = core.kl_controller(settings)
        say_if_the_kl_controller_cannot_move(self.kl_controller, settings)
        distributed.broadcast_parameters(trainable)  # every process starts from rank 0's weights
        self.policy.eval()  # no dropout: log-probs at sampling and at update time must agree
        self.seconds, self.generated_tokens = {}, 0  # where an update's time goes
        self.done_updates = 0  # updates finished before this process started (a resumed run)

    # ---- the loop ----------------------------------------------------------------------

    def train(self, prompts: list, seed: int, checkpoints: Path, keep: dict) -> dict:
        """Run the PPO updates up to `total_updates` over batches drawn from `prompts` (message
        lists); every `save_steps` updates a checkpoint in `checkpoints/` holds what resuming
        needs, with `keep` (what the run measured before training, and the identities of its inputs) alongside."""
        if len(prompts) < self.settings.batch_size:  # no full batch: the loop below would never get one
            raise UserError(f"ppo.batch_size={self.settings.batch_size}: the training split has only {len(prompts)} prompts")
        share = self.local_share()
        order, last = random.Random(seed), {}
        batches = self._batches(prompts, order)
        for _ in range(self.done_updates):  # a resumed run draws the prompts an uninterrupted one would
            next(batches)
        for update in range(self.done_updates + 1, self.settings.total_updates + 1):
            rollout = self.rollout(next(batches)[share])  # this process's part of the global batch
            mask = rollout.samples.response_mask
            scores = reward_scores(rollout.scores, rollout.samples.ended_with_eos, self.settings)
            rewards, kl = core.kl_penalized_rewards(scores, rollout.logprobs, rollout.ref_logprobs, mask, self.kl_controller.value)
            advantages, returns = core.gae(rewards, rollout.values, mask, self.settings.gamma, self.settings.lam)
            advantages = core.masked_whiten(advantages, mask, reduce=distributed.all_sum)  # over the global batch
            with self.timed("optimisation"):
                stats = self.optimise(rollout, advantages, returns, update)
            statistics = {**rollout_statistics(rollout, kl, rewards), **stats}
            record = {"step": update, **statistics, "objective/kl_coef": self.kl_controller.value}
            if isinstance(self.kl_controller, core.AdaptiveKLController):
                record["objective/kl_goal"] = self.kl_controller.goal(update)  # what the controller steers this update's KL to
            self.kl_controller.update(statistics["objective/kl"], self.settings.batch_size)  # the same on every process
            if update % self.settings.logging_steps == 0 or update == self.settings.total_updates:
                self.log(record)
            more = update < self.settings.total_updates
            stop = more and preemption.asked()  # a scheduler's signal: a checkpoint here, then stop (collective: every update)
            if stop or (more and self.settings.save_steps > 0 and update % self.settings.save_steps == 0):
                self.save_checkpoint(checkpoints / f"checkpoint-{update}", update, keep)
            if stop:
                raise preemption.Preempted(update)
            last = record
        ran = self.settings.total_updates - self.done_updates  # updates timed in this process (>= 1: see resume)
        timing = {f"time/{phase}_per_update": seconds / ran for phase, seconds in self.seconds.items()}
        timing["time/generated_tokens_per_second"] = self.generated_tokens / self.seconds["generation"]
        final = {"objective/kl_coef_final": self.kl_controller.value}  # after the last update's controller step
        return {**{key: value for key, value in last.items() if key != "step"}, **final, **timing}

    def local_share(self) -> slice:
        """This process's part of each global batch: batch_size / processes prompts."""
        world, settings = distributed.world_size(), self.settings
        if settings.batch_size % world or settings.mini_batch_size % world:
            raise UserError(
                f"ppo.batch_size={settings.batch_size} and ppo.mini_batch_size={settings.mini_batch_size} are global: "
                f"both must be multiples of the {world} processes"
            )
        size = settings.batch_size // world
        return slice(distributed.rank() * size, (distributed.rank() + 1) * size)

    def _batches(self, prompts: list, order: random.Random):
        """Endless batches of prompts: reshuffled passes over the dataset."""
        while True:
            shuffled = prompts[:]
            order.shuffle(shuffled)
            for start in range(0, len(shuffled) - self.settings.batch_size + 1, self.settings.batch_size):
                yield shuffled[start : start + self.settings.batch_size]

    # ---- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, path: Path, update: int, keep: dict) -> None:
        """The trainable weights (adapter or whole policy), value head, optimizer, KL coefficient
        and every process's random state after `update`; the mark, written last, makes it
        complete. Older checkpoints beyond `save_total_limit` are deleted once this one is whole.
        Weights and optimizer are equal on every process: rank 0 writes them."""
        path.mkdir(parents=True, exist_ok=True)
        if is_main_process():
            (path / CHECKPOINT_MARK).unlink(missing_ok=True)  # a directory being rewritten is incomplete until the end
            torch.save(
                {
                    "policy": {name: p.detach() for name, p in self.policy.named_parameters() if p.requires_grad},
                    "value_head": self.value_head.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                },
                path / "ppo_state.pt",
            )
        random_state = {"torch_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        torch.save(random_state, path / f"rng_state_{distributed.rank()}.pt")
        distributed.barrier()  # every process's part is on disk before the mark says so
        if not is_main_process():
            return
        mark = {"step": update, "kl_coef": self.kl_controller.value, "kl_engaged": self.kl_controller.engaged, "keep": keep}
        mark["processes"] = distributed.world_size()
        write_json(path / CHECKPOINT_MARK, mark)
        older = sorted((p for p in path.parent.glob("checkpoint-*") if p != path), key=checkpoint_step)
        for stale in older[: max(len(older) - self.settings.save_total_limit + 1, 0)]:
            shutil.rmtree(stale, ignore_errors=True)

    def resume(self, path: Path, mark: dict) -> dict:
        """Load a checkpoint written by save_checkpoint (`mark`: its mark file); return the `keep`
        metrics saved with it."""
        if mark["step"] >= self.settings.total_updates:
            raise UserError(f"{path} is at update {mark['step']}, not before ppo.total_updates={self.settings.total_updates}")
        processes = distributed.world_size()
        if mark.get("processes", 1) != processes:
            raise UserError(
                f"{path} was written by {mark.get('processes', 1)} processes: resume it with as many (this launch has {processes})"
            )
        state = torch.load(path / "ppo_state.pt", map_location="cpu", weights_only=True)  # load_state_dict moves it
        unexpected = self.policy.load_state_dict(state["policy"], strict=False).unexpected_keys
        if unexpected:
            raise UserError(f"{path}: the checkpoint's weights do not fit this policy (e.g. {unexpected[0]})")
        self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        random_state = torch.load(path / f"rng_state_{distributed.rank()}.pt", weights_only=True)
        torch.set_rng_state(random_state["torch_rng"])
        if random_state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(random_state["cuda_rng"])
        self.kl_controller.value = mark["kl_coef"]
        self.kl_controller.engaged = mark.get("kl_engaged", mark["kl_coef"] != self.settings.kl_coef)  # older marks: it moved
        self.kl_controller.updates = mark["step"]  # where on its path (ppo.kl_ramp) the controller goes on
        self.done_updates = mark["step"]
        return mark["keep"]

    # ---- 1-3: rollout, scoring, evaluation ---------------------------------------------

    @torch.no_grad()
    def rollout(self, prompts: list) -> Rollout:
        with self.timed("generation"):
            samples = self.sample(prompts)
        with self.timed("policy_and_value_forward"):
            logits, hidden = response_outputs(self.policy, samples, self.settings.temperature, hidden=True)
            values = self.value_head(hidden)
        with self.timed("reference_forward"), as_reference(self.policy, self.ref_policy) as reference:
            ref_logprobs = response_logprobs(reference, samples, self.settings.temperature)
        with self.timed("scoring"):
            scores = self.reward.scores(prompts, samples.texts, self.device)
        self.generated_tokens += int(samples.response_mask.sum())
        return Rollout(
            samples=samples,
            logprobs=logprobs_from_logits(logits, samples.responses),
            ref_logprobs=ref_logprobs,
            values=values,
            entropy=entropy_from_logits(logits),
            scores=scores,
        )

    @contextlib.contextmanager
    def timed(self, phase: str):
        """Adds the wall time of the block to `self.seconds[phase]` (reported as time/<phase>)."""
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def sample(self, prompts: list) -> Samples:
        return sample(self.policy, self.tokenizer, prompts, self.settings, self.device)

    # ---- 6: optimisation -----------------------------------------------------------------

    def optimise(self, rollout: Rollout, advantages, returns, update: int) -> dict:
        """ppo_epochs passes over shuffled mini-batches; returns the mean losses and statistics.

        Each process holds its share of every global mini-batch. Its losses are its token sums
        over the mini-batch's token count on all processes, and the gradients are summed across
        them: the update is that of the global token mean, the same on 1 or N processes however
        the response lengths fall (a per-process mean would weigh each token of a process with
        few tokens more). A non-finite loss or gradient stops the run before the optimizer step
        can write it into the weights (and so into a checkpoint)."""
        totals, steps = None, 0
        world = distributed.world_size()
        for _ in range(self.settings.ppo_epochs):
            for index in torch.randperm(self.settings.batch_size // world).split(self.settings.mini_batch_size // world):
                part = rollout.samples.select(index)
                mask = part.response_mask
                tokens = distributed.all_sum(mask.sum())  # real tokens in the global mini-batch
                logits, hidden = response_outputs(self.policy, part, self.settings.temperature, hidden=True)
                logprobs = logprobs_from_logits(logits, part.responses)
                pg_loss, pg_stats = core.policy_loss(
                    logprobs, rollout.logprobs[index], advantages[index], mask, self.settings.cliprange, count=tokens
                )
                vf_loss, vf_stats = core.value_loss(
                    self.value_head(hidden), rollout.values[index], returns[index], mask, self.settings.cliprange_value, count=tokens
                )
                loss = pg_loss + self.settings.vf_coef * vf_loss
                # The global values: each process's share added up (every process stops, or none does).
                step = distributed.all_sum(
                    torch.stack([pg_loss, vf_loss, pg_stats["clipfrac"], pg_stats["approxkl"], vf_stats["clipfrac"]]).detach().double()
                )
                if not torch.isfinite(step[:2]).all():
                    policy, value = step[:2].tolist()
                    raise NonFiniteLoss(f"PPO diverged at update {update}: the loss is not finite (policy {policy}, value {value})")
                self.optimizer.zero_grad()
                loss.backward()
                distributed.sum_gradients(self.trainable)  # the gradient of the global mini-batch's token mean
                grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.settings.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    raise NonFiniteLoss(f"PPO diverged at update {update}: the gradient norm is {grad_norm.item()}")
                self.optimizer.step()
                totals = step if totals is None else totals + step
                steps += 1
        names = ("loss/policy", "loss/value", "policy/clipfrac", "policy/approxkl", "value/clipfrac")
        return dict(zip(names, (totals / steps).tolist()))

    # ---- evaluation ------------------------------------------------------------------------

    @torch.no_grad()
    def score_held_out(self, prompts: list, seed: int, measure_kl: bool = False) -> tuple:
        """(the reward-model score of a sampled response to each of `prompts` (the held-out ones),
        each response's length in tokens, with `measure_kl` its KL to the reference - the estimator
        and temperature of `objective/kl` - else []), in their order; the prompts are shared out
        between the processes in contiguous blocks, and each block is sampled under seeds fixed by
        its position, so the scores before and after training are paired draws."""
        block = -(-len(prompts) // distributed.world_size())
        first = distributed.rank() * block
        mine = prompts[first : first + block]
        models = (self.policy, self.tokenizer, self.reward)
        options = {"measure_kl": measure_kl, "reference": self.ref_policy}
        held_out = (
            held_out_scores(*models, mine, self.settings, self.device, self.settings.batch_size, seed + first, **options)
            if mine
            else ([], [], [])
        )
        return tuple(distributed.all_gather_list(values) for values in held_out)
