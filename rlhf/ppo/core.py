"""The math of PPO for RLHF, as small pure-torch functions.

Read top to bottom, this is one PPO step: score a rollout with a per-token KL penalty
(`kl_penalized_rewards`), turn rewards into advantages and value targets (`gae`), whiten the
advantages (`masked_whiten`), then minimise the clipped policy and value losses
(`policy_loss`, `value_loss`) while a KL controller tunes the penalty's weight.

References (equations cited next to the code that implements them):
  [PPO]   Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
  [GAE]   Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
          Advantage Estimation".
  [IGPT]  Ouyang et al. 2022, "Training language models to follow instructions with human
          feedback" (InstructGPT).
  [ZIEG]  Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences".
  [NIMPL] Huang et al. 2024, "The N Implementation Details of RLHF with PPO".

Conventions: per-token tensors are [batch, response_len]. `mask` is 1 on real response tokens
and 0 on the padding after a response ends; a response is a prefix of its row (once 0, always
0). Padded positions never influence a result: statistics skip them and per-token outputs are 0
there.
"""

import torch

from rlhf.generation import at_least_float32, token_kl  # at_least_float32: statistics and targets never in half precision

WHITEN_EPS = 1e-8


# --- masked statistics ---------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None, count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of `values` over the entries where `mask` is 1 (over `dim`, or over everything).

    `torch.where` rather than `values * mask`: padding may hold inf/nan (e.g. logprobs of pad
    tokens), and `nan * 0` is still nan. A slice with no real entries has mean 0.
    `count` replaces the number of masked entries as the divisor: with several processes sharing
    one batch, the count over all of them makes each process's result its share of the global
    mean (the shares then add up to the mean over every token, whatever each process holds).
    """
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values)).sum(dim=dim)
    if count is None:
        count = mask.sum(dim=dim)
    return total / count.to(values.dtype).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce=None) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8), with mean and (Bessel-corrected) var over the masked entries only.

    Advantage whitening ([NIMPL], "normalize advantages"): keeps the policy-gradient scale
    stable across batches whose reward scale drifts. With `shift_mean=False` the mean is added
    back, so only the scale changes (used for rewards, whose sign carries meaning).
    Padded positions are set to 0. `reduce` sums a tensor over the processes of a launch
    (`rlhf.distributed.all_sum`): mean and var are then those of the whole global batch.
    """
    reduce = reduce or (lambda tensor: tensor)
    values = at_least_float32(values)  # the count and the sums too: bfloat16 has integers exactly only up to 256
    mask = mask.bool()
    masked = torch.where(mask, values, torch.zeros_like(values))
    total, count = reduce(torch.stack([masked.sum(), mask.sum().to(values.dtype)]))
    if count < 2:
        raise ValueError(f"unbiased variance needs at least 2 masked entries, got {int(count)}")
    mean = total / count
    squares = reduce(torch.where(mask, (values - mean) ** 2, torch.zeros_like(values)).sum())
    var = squares / (count - 1)
    whitened = (values - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


# --- rewards -------------------------------------------------------------------------------


def missing_eos_penalty(scores: torch.Tensor, ended_with_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the score of each response that did not end in EOS.

    A response truncated at the length limit is often still rated well by the reward model;
    without a penalty the policy learns to ramble to the limit ([NIMPL], on penalising
    responses without an EOS token).
    """
    return scores - penalty * (~ended_with_eos.bool()).to(scores.dtype)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token ([batch]); valid because a response is a prefix."""
    lengths = mask.bool().sum(dim=1)
    if (lengths == 0).any():
        raise ValueError("every response needs at least one real token (a row of the mask is all 0)")
    return lengths - 1


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: a KL penalty at every token plus the reward-model score at the end.

    [IGPT] Eq. (2) (and [ZIEG] Sec. 2.2) maximise r_theta(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x)).
    The log-ratio of a sequence is the sum of its per-token log-ratios, so the penalty can be paid
    token by token, r_t = -beta * (log pi(y_t) - log pi_ref(y_t)), with the sequence-level score
    r_theta(x, y) added at the last real token ([NIMPL], per-token KL penalty). Per-token
    rewards give GAE a denser signal than one reward at the end. The per-token log-ratio is the
    unbiased "k1" estimate of KL(pi || pi_ref).

    Returns (rewards, kl), both [batch, response_len] and 0 on padding.
    """
    kl = token_kl(logprobs, ref_logprobs, mask)  # the estimator every stage reports
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl


# --- advantages ------------------------------------------------------------------------------


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation; returns (advantages, returns), 0 on padding.

    [GAE] Sec. 3 / [PPO] Eqs. (11)-(12):
      delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
      A_t     = delta_t + gamma * lam * A_{t+1}       (= sum_l (gamma*lam)^l delta_{t+l})
    The episode ends at the last real token, so V and A beyond it count as 0 (no bootstrapping
    from padding). returns_t = A_t + V_t is the TD(lambda) target for the value head.
    Outputs are targets, not things to differentiate through, hence no_grad. Advantages are
    not whitened here; call `masked_whiten` on them.
    """
    real = mask.bool()
    rewards, values = at_least_float32(rewards), at_least_float32(values)  # each step rounded to bfloat16 would carry into the next
    zeros = torch.zeros_like(values)
    rewards, values = torch.where(real, rewards, zeros), torch.where(real, values, zeros)
    batch, length = rewards.shape
    advantages = torch.zeros_like(values)
    next_value = next_advantage = torch.zeros(batch, dtype=values.dtype, device=values.device)
    for t in reversed(range(length)):  # backwards: A_t needs A_{t+1}
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = torch.where(real[:, t], delta + gamma * lam * next_advantage, zeros[:, t])
        next_value, next_advantage = values[:, t], advantages[:, t]
    returns = torch.where(real, advantages + values, zeros)
    return advantages, returns


# --- losses --------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, negated to be minimised; returns (loss, {clipfrac, approxkl}).

    [PPO] Eq. (7): L^CLIP = E[min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)], with
    ratio = pi(a|s) / pi_old(a|s). Negating turns min into max. Clipping removes the incentive
    to move the ratio outside [1 - eps, 1 + eps]; the max keeps the objective a pessimistic
    bound, so the unclipped term still applies when it is the worse one.
    clipfrac is the share of tokens where the clipped term won (gradient 0 there); approxkl is
    0.5 * E[(log ratio)^2], the "k2" estimate of KL(pi_old || pi) ([NIMPL] logs the same).
    Every mean is over the real tokens: `count` of them (see `masked_mean`), by default the mask's.
    """
    real = mask.bool()
    # Log-ratio 0 on padding, so exp() cannot overflow on garbage logprobs of pad tokens.
    log_ratio = torch.where(real, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, count=count)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask, count=count).detach(),
        "approxkl": (0.5 * masked_mean(log_ratio**2, mask, count=count)).detach(),
    }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
    count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss; returns (loss, {clipfrac}).

    The value-head analogue of [PPO] Eq. (7), from OpenAI's PPO code and kept in RLHF
    ([NIMPL], value-function clipping): the new prediction may move at most `cliprange_value`
    from the rollout-time one, and the loss takes the worse of the clipped and unclipped squared
    errors, 0.5 * E[max((V - R)^2, (V_clip - R)^2)], over `count` real tokens (see `masked_mean`).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask, count=count)
    stats = {"clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask, count=count).detach()}
    return loss, stats


# --- KL coefficient controllers ----------------------------------------------------------------


def kl_controller(settings):
    """The KL controller `settings` (ppo.*) ask for: adaptive, along `kl_ramp` x `total_updates`
    updates, or a fixed kl_coef."""
    if not settings.adaptive_kl:
        return FixedKLController(settings.kl_coef)
    return AdaptiveKLController(settings.kl_coef, settings.target, settings.horizon, settings.kl_ramp * settings.total_updates)


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef
        self.engaged = False  # never adapts

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""


class AdaptiveKLController:
    """Adapts beta to keep the policy's KL to the reference near `target` ([ZIEG] Sec. 2.2),
    along a path that reaches the target `ramp_updates` updates into the run:

      goal  = target * min(1, update / ramp_updates)
      e     = clip((KL - goal) / target, -0.2, 0.2)
      beta <- beta * (1 + K_beta * e),   with K_beta = n_steps / horizon
    A log-space proportional controller: beta rises while the KL is above its goal and falls
    while it is below; the clip bounds the per-update change, and `horizon` (in samples) sets
    how fast. With goal = target this is Ziegler et al.'s rule, e = clip(KL / target - 1).

    Why a path: a run starts at the reference, KL 0, and the policy needs updates to move. Held
    to the target from the first update, the rule lowers beta at every one of them - on the tiny
    model 10x in the first 10 updates at horizon = batch - and the KL then overshoots while beta
    climbs back. Along the path the error starts near 0, and beta can fall from the start where
    the policy moves more slowly than the path (a start too strong for a short run) or rise from
    the start where it moves faster (a start too weak), instead of waiting for the KL to reach
    the target before it does either.

    ramp_updates = 0: the target from the first update, with beta held until the KL first
    reaches it (anti-windup); a target the KL never reaches then leaves beta where it started.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float, ramp_updates: float = 0.0):
        if target <= 0 or horizon <= 0 or ramp_updates < 0:
            raise ValueError(f"target and horizon must be positive and ramp_updates >= 0, got {target}, {horizon}, {ramp_updates}")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon
        self.ramp_updates = ramp_updates
        self.updates = 0  # controller steps taken: where on the path the run is
        self.engaged = False  # without a path: the KL has reached the target, and the rule runs

    def goal(self, update: int) -> float:
        """The KL the controller steers to after `update` updates (1-based)."""
        return self.target * min(1.0, update / self.ramp_updates) if self.ramp_updates > 0 else self.target

    def update(self, current_kl: float, n_steps: int) -> None:
        """One controller step after a batch of `n_steps` samples whose mean KL was `current_kl`."""
        self.updates += 1
        self.engaged = self.engaged or self.ramp_updates > 0 or float(current_kl) >= self.target
        if not self.engaged:
            return
        error = min(max((float(current_kl) - self.goal(self.updates)) / self.target, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def reach(self, n_steps: int, updates: int) -> tuple:
        """(the most beta can grow, the most it can shrink) over `updates` steps of `n_steps`
        samples, as factors: every step at the clip, (1 +- 0.2 n_steps / horizon) ** updates."""
        step = 0.2 * n_steps / self.horizon
        return (1.0 + step) ** updates, max(1.0 - step, 0.0) ** updates

    def horizon_to_reach(self, n_steps: int, updates: int, factor: float = 10.0) -> float:
        """The horizon at which beta can grow by `factor` over `updates` steps of `n_steps`."""
        return 0.2 * n_steps / (factor ** (1.0 / updates) - 1.0)
