"""PPO math (rlhf.ppo.core) against values worked out by hand or by independent plain-Python
loops; none of the expected numbers come from the function under test."""

import math
import statistics

import pytest
import torch

from rlhf.generation import entropy_from_logits, logprobs_from_logits
from rlhf.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    missing_eos_penalty,
    policy_loss,
    value_loss,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# --- masked statistics ---------------------------------------------------------------------

VALUES = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = t([[1, 1, 0], [1, 0, 0]])  # real entries: 1, 2, 4


def test_masked_mean_over_all_and_per_row():
    assert masked_mean(VALUES, MASK).item() == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3
    assert masked_mean(VALUES, MASK, dim=1).tolist() == pytest.approx([1.5, 4.0])
    assert masked_mean(VALUES, MASK.bool()).item() == pytest.approx(7 / 3)  # bool mask too


def test_masked_mean_ignores_nan_and_inf_in_padding():
    values = t([[1.0, 2.0, float("nan")], [4.0, float("inf"), float("-inf")]])
    assert masked_mean(values, MASK).item() == pytest.approx(7 / 3)


def test_masked_mean_of_an_empty_row_is_zero():
    mask = t([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(VALUES, mask, dim=1).tolist() == pytest.approx([1.5, 0.0])


def test_masked_whiten_needs_two_entries():
    with pytest.raises(ValueError):
        masked_whiten(VALUES, t([[1, 0, 0], [0, 0, 0]]))


def test_masked_whiten_by_hand_and_ignores_padding():
    values = t([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    # entries 1, 2, 3, 4: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    sd = math.sqrt(5 / 3 + 1e-8)
    expected = [[-1.5 / sd, -0.5 / sd, 0.5 / sd], [1.5 / sd, 0.0, 0.0]]
    out = masked_whiten(values, mask)
    assert out.tolist()[0] == pytest.approx(expected[0])
    assert out.tolist()[1] == pytest.approx(expected[1])
    # over the masked entries: mean 0, (unbiased) variance 1
    real = out[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert real.var(unbiased=True).item() == pytest.approx(1.0, rel=1e-6)
    # whatever sits in the padding changes nothing
    other_padding = values.clone()
    other_padding[1, 1:] = -7.0
    assert torch.equal(masked_whiten(other_padding, mask), out)


def test_masked_whiten_without_mean_shift_keeps_the_mean():
    values = t([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    sd = math.sqrt(5 / 3 + 1e-8)
    out = masked_whiten(values, mask, shift_mean=False)
    assert out[0].tolist() == pytest.approx([2.5 - 1.5 / sd, 2.5 - 0.5 / sd, 2.5 + 0.5 / sd])
    assert out[1].tolist() == pytest.approx([2.5 + 1.5 / sd, 0.0, 0.0])
    assert out[mask.bool()].mean().item() == pytest.approx(2.5)


# --- rewards -------------------------------------------------------------------------------


def test_missing_eos_penalty():
    scores = t([1.0, 2.0, 3.0])
    ended = torch.tensor([True, False, True])
    assert missing_eos_penalty(scores, ended, 1.5).tolist() == pytest.approx([1.0, 0.5, 3.0])


def test_reward_scores_penalise_then_whiten_by_hand():
    from rlhf.ppo.trainer import PPOConfig, reward_scores

    scores, ended = t([0.10, 0.30, 0.05, 0.15]), torch.tensor([True, True, False, True])
    penalised = [0.10, 0.30, 0.05 - 0.2, 0.15]
    mean, std = statistics.mean(penalised), statistics.stdev(penalised)  # Bessel-corrected, as masked_whiten
    whitened = reward_scores(scores, ended, PPOConfig(missing_eos_penalty=0.2, whiten_scores=True))
    assert whitened.tolist() == pytest.approx([(x - mean) / std for x in penalised], rel=1e-6)
    assert reward_scores(scores, ended, PPOConfig(missing_eos_penalty=0.2, whiten_scores=False)).tolist() == pytest.approx(penalised)


def test_whitened_reward_scores_do_not_depend_on_the_reward_models_scale():
    """kl_coef then means the same for an RM whose scores spread 0.1 as for one spreading 10."""
    from rlhf.ppo.trainer import PPOConfig, reward_scores

    scores, ended = t([0.10, 0.30, 0.05, 0.15]), torch.ones(4, dtype=torch.bool)
    settings = PPOConfig(whiten_scores=True)
    small, large = reward_scores(scores, ended, settings), reward_scores(100 * scores - 3, ended, settings)
    assert large.tolist() == pytest.approx(small.tolist(), rel=1e-6)


def test_rlhf_reward_is_the_return_ppo_maximised():
    """objective/rlhf_reward: the score PPO was given (here after a missing-EOS penalty of 5) less
    kl_coef x the response's KL, by hand; objective/scores stays the reward model's own."""
    from rlhf.generation import Samples
    from rlhf.ppo.trainer import PPOConfig, Rollout, reward_scores, rollout_statistics

    mask = t([[1, 1, 1], [1, 1, 0]])
    logprobs, ref_logprobs = t([[-1.0, -2.0, -0.5], [-0.3, -0.2, 0.0]]), t([[-1.5, -1.0, -0.5], [-0.1, -0.6, 0.0]])
    scores, ended = t([1.0, 3.0]), torch.tensor([True, False])
    samples = Samples(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5), mask, ["a", "b"], ended)
    rollout = Rollout(samples, logprobs, ref_logprobs, torch.zeros(2, 3), torch.zeros(2, 3), scores)
    given = reward_scores(scores, ended, PPOConfig(missing_eos_penalty=5.0, whiten_scores=False))
    rewards, kl = kl_penalized_rewards(given, logprobs, ref_logprobs, mask, kl_coef=0.1)
    statistics_ = rollout_statistics(rollout, kl, rewards)
    kl_by_hand = [(-1.0 + 1.5) + (-2.0 + 1.0) + 0.0, (-0.3 + 0.1) + (-0.2 + 0.6)]  # -0.5 and 0.2 nats
    assert statistics_["objective/rlhf_reward"] == pytest.approx(((1.0 - 0.1 * kl_by_hand[0]) + (3.0 - 5.0 - 0.1 * kl_by_hand[1])) / 2)
    assert statistics_["objective/scores"] == pytest.approx(2.0)
    assert statistics_["objective/kl"] == pytest.approx(sum(kl_by_hand) / 2)
    # With whitening (the default) the given scores average 0: what is left is the KL penalty
    given = reward_scores(scores, ended, PPOConfig(missing_eos_penalty=5.0, whiten_scores=True))
    rewards, kl = kl_penalized_rewards(given, logprobs, ref_logprobs, mask, kl_coef=0.1)
    assert rollout_statistics(rollout, kl, rewards)["objective/rlhf_reward"] == pytest.approx(-0.1 * sum(kl_by_hand) / 2)


def test_the_value_head_starts_at_exactly_zero():
    """Random initial values (rms ~1.35 on SmolLM2) swamped scores of sd ~0.18 within a prompt:
    the first advantages must come from the rewards alone, while the head can still learn."""
    from rlhf.ppo.trainer import ValueHead

    head = ValueHead(16)
    hidden = torch.randn(3, 5, 16) * 4
    assert torch.equal(head(hidden), torch.zeros(3, 5))
    (head(hidden) - 1).pow(2).sum().backward()  # a target of 1 everywhere
    assert head.linear.weight.grad.abs().sum() > 0


def test_the_value_head_gives_float32_values_under_bfloat16_autocast():
    """The values feed GAE and are the value loss's targets: a Linear under bfloat16 autocast
    would hand them over with 8 bits of mantissa."""
    from rlhf.ppo.trainer import ValueHead

    head = ValueHead(16)
    torch.nn.init.normal_(head.linear.weight)
    torch.nn.init.normal_(head.linear.bias)
    hidden = torch.randn(2, 3, 16)
    by_hand = hidden.double() @ head.linear.weight.double()[0] + head.linear.bias.double()[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = head(hidden)
    assert values.dtype == torch.float32
    assert values.double().flatten().tolist() == pytest.approx(by_hand.flatten().tolist(), abs=1e-5)


def test_kl_penalized_rewards_by_hand():
    scores = t([10.0, 20.0])
    logprobs = t([[-1.0, -2.0, -3.0], [-0.5, -1.0, 9.0]])
    ref_logprobs = t([[-1.5, -1.0, -3.0], [-1.0, -2.0, 0.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # kl = logprob - ref_logprob on real tokens, 0 on padding
    assert kl.tolist()[0] == pytest.approx([0.5, -1.0, 0.0])
    assert kl.tolist()[1] == pytest.approx([0.5, 1.0, 0.0])
    # r_t = -0.1 * kl_t, plus the score on the last real token (index 2, then index 1)
    assert rewards.tolist()[0] == pytest.approx([-0.05, 0.1, 0.0 + 10.0])
    assert rewards.tolist()[1] == pytest.approx([-0.05, -0.1 + 20.0, 0.0])


def test_kl_penalized_rewards_rejects_an_empty_response():
    with pytest.raises(ValueError):
        kl_penalized_rewards(t([1.0]), t([[0.0, 0.0]]), t([[0.0, 0.0]]), t([[0, 0]]), kl_coef=0.1)


# --- GAE -------------------------------------------------------------------------------------


def test_gae_1x3_by_hand():
    rewards, values, mask = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), t([[1, 1, 1]])
    # gamma = 1, lam = 0.95; V after the last token is 0
    # delta_2 = 1 + 0 - 0.7 = 0.3               A_2 = 0.3
    # delta_1 = 0 + 0.7 - 0.6 = 0.1             A_1 = 0.1 + 0.95 * 0.3   = 0.385
    # delta_0 = 0 + 0.6 - 0.5 = 0.1             A_0 = 0.1 + 0.95 * 0.385 = 0.46575
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert advantages.tolist()[0] == pytest.approx([0.46575, 0.385, 0.3])
    assert returns.tolist()[0] == pytest.approx([0.96575, 0.985, 1.0])  # A + V


def test_gae_padding_is_not_bootstrapped_from():
    # The same response as above, with garbage in a padded 4th position.
    rewards, values, mask = t([[0.0, 0.0, 1.0, 5.0]]), t([[0.5, 0.6, 0.7, 9.0]]), t([[1, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert advantages.tolist()[0] == pytest.approx([0.46575, 0.385, 0.3, 0.0])
    assert returns.tolist()[0] == pytest.approx([0.96575, 0.985, 1.0, 0.0])


def test_gae_matches_the_explicit_sum_on_ragged_rows():
    """A_t = sum_l (gamma*lam)^l delta_{t+l} (GAE paper), as a plain double loop."""
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    values = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    lengths = [5, 3, 1]
    mask = t([[1.0 if j < n else 0.0 for j in range(5)] for n in lengths])
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        r, v = rewards[i].tolist(), values[i].tolist()
        v_next = v[1:n] + [0.0]
        deltas = [r[k] + gamma * v_next[k] - v[k] for k in range(n)]
        for j in range(5):
            if j < n:
                expected = sum((gamma * lam) ** (k - j) * deltas[k] for k in range(j, n))
                assert advantages[i, j].item() == pytest.approx(expected)
                assert returns[i, j].item() == pytest.approx(expected + v[j])
            else:
                assert advantages[i, j].item() == 0.0 and returns[i, j].item() == 0.0


def test_gae_of_bfloat16_values_is_computed_in_float32():
    """A bfloat16 recursion rounds every A_t to 8 bits of mantissa and carries the error into
    A_{t-1}; the targets come out in float32, equal to the recursion done by hand in float64."""
    values = torch.tensor([[0.1234, -0.5678, 0.9012, 0.3456, -0.7891]]).to(torch.bfloat16)
    rewards = t([[0.011, -0.023, 0.037, -0.041, 1.2345]])
    gamma, lam = 0.99, 0.95
    v, r = values.double()[0].tolist(), rewards[0].tolist()
    expected, next_value, next_advantage = [0.0] * 5, 0.0, 0.0
    for i in reversed(range(5)):
        next_advantage = r[i] + gamma * next_value - v[i] + gamma * lam * next_advantage
        expected[i], next_value = next_advantage, v[i]
    advantages, returns = gae(rewards.float(), values, torch.ones(1, 5), gamma, lam)
    assert advantages.dtype == returns.dtype == torch.float32
    assert advantages[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert returns[0].tolist() == pytest.approx([a + b for a, b in zip(expected, v)], abs=1e-6)


def test_masked_whiten_of_bfloat16_values_counts_every_entry():
    """257 entries: bfloat16 holds integers exactly only up to 256, so a count kept in the
    values' dtype is 256; the statistics come out as statistics.mean/stdev compute them."""
    values = (torch.arange(257, dtype=torch.float32) / 100).to(torch.bfloat16)[None]
    xs = values.double()[0].tolist()
    mean, std = statistics.mean(xs), statistics.stdev(xs)
    whitened = masked_whiten(values, torch.ones_like(values))
    assert whitened.dtype == torch.float32
    assert whitened[0].tolist() == pytest.approx([(x - mean) / std for x in xs], abs=1e-5)


def test_gae_outputs_carry_no_gradient():
    values = t([[0.5, 0.6]]).requires_grad_()
    advantages, returns = gae(t([[0.0, 1.0]]), values, t([[1, 1]]), gamma=1.0, lam=1.0)
    assert not advantages.requires_grad and not returns.requires_grad


# --- losses --------------------------------------------------------------------------------


def test_policy_loss_some_ratios_clip_some_do_not():
    # old_logprobs = 0, so ratio = exp(logprob); cliprange 0.2 -> ratios clipped to [0.8, 1.2]
    ratios = [[1.5, 0.5, 1.1], [0.5, 1.0, 1.0]]
    logprobs = t([[math.log(r) for r in row] for row in ratios])
    logprobs[1, 1] = 1000.0  # padding: exp would overflow if it were used
    logprobs.requires_grad_()
    old_logprobs = torch.zeros(2, 3, dtype=torch.float64)
    advantages = t([[1.0, 1.0, -2.0], [-1.0, 5.0, 5.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    # per real token: max(-A * ratio, -A * clip(ratio))
    #   ratio 1.5, A  1: max(-1.5, -1.2) = -1.2  (clipped wins)
    #   ratio 0.5, A  1: max(-0.5, -0.8) = -0.5  (unclipped)
    #   ratio 1.1, A -2: max( 2.2,  2.2) =  2.2  (inside the range: not counted as clipped)
    #   ratio 0.5, A -1: max( 0.5,  0.8) =  0.8  (clipped wins)
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2 + 0.8) / 4)
    assert stats["clipfrac"].item() == pytest.approx(2 / 4)
    log_ratios = [math.log(1.5), math.log(0.5), math.log(1.1), math.log(0.5)]
    assert stats["approxkl"].item() == pytest.approx(0.5 * sum(x * x for x in log_ratios) / 4)
    # Where the clipped term wins the gradient is 0; elsewhere d(-A * exp(lp)) / dlp / 4.
    loss.backward()
    grad = logprobs.grad.tolist()
    assert grad[0] == pytest.approx([0.0, -1.0 * 0.5 / 4, 2.0 * 1.1 / 4])
    assert grad[1] == pytest.approx([0.0, 0.0, 0.0])


def test_policy_loss_on_policy_is_minus_mean_advantage():
    logprobs = t([[-1.0, -2.0, -3.0]])
    loss, stats = policy_loss(logprobs, logprobs.clone(), t([[1.0, 2.0, 6.0]]), t([[1, 1, 1]]), 0.2)
    assert loss.item() == pytest.approx(-3.0)  # ratio 1: -(1 + 2 + 6) / 3
    assert stats["clipfrac"].item() == 0.0 and stats["approxkl"].item() == 0.0


def test_value_loss_clipped_vs_not():
    old_values = t([[1.0, 1.0, 1.0, 1.0]])
    values = t([[1.5, 1.1, 0.5, 100.0]])
    returns = t([[2.0, 0.0, 1.0, -100.0]])
    mask = t([[1, 1, 1, 0]])
    # cliprange 0.2: v_clipped = [1.2, 1.1, 0.8]
    #   t0: max((1.5-2)^2, (1.2-2)^2) = max(0.25, 0.64) = 0.64   (clipped wins)
    #   t1: max((1.1-0)^2, (1.1-0)^2) = 1.21                    (inside: not clipped)
    #   t2: max((0.5-1)^2, (0.8-1)^2) = max(0.25, 0.04) = 0.25   (unclipped)
    loss, stats = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21 + 0.25) / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)


def test_value_loss_unclipped_is_half_mse():
    values, returns = t([[1.0, 2.0]]), t([[0.0, 0.0]])
    loss, stats = value_loss(values, values.clone(), returns, t([[1, 1]]), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 4.0) / 2)
    assert stats["clipfrac"].item() == 0.0


# --- from logits -----------------------------------------------------------------------------


def test_logprobs_from_logits_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]; shifting all logits by 1000 changes nothing
    logits = t([[[0.0, math.log(3)], [1000.0, 1000.0 + math.log(3)]]])  # [1, 2, 2]
    tokens = torch.tensor([[1, 0]])
    out = logprobs_from_logits(logits, tokens)
    assert out.shape == (1, 2)
    assert out[0].tolist() == pytest.approx([math.log(3 / 4), math.log(1 / 4)])


def test_logprobs_from_logits_upcasts_bf16():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0]]], dtype=torch.bfloat16)
    out = logprobs_from_logits(logits, torch.tensor([[2]]))
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(math.log(1 / 4))


def test_entropy_from_logits_by_hand():
    logits = t(
        [
            [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, math.log(2), 0.0]],
            [[1000.0, 1000.0, 0.0, 0.0], [7.0] * 4],
        ]
    )
    # uniform over 4: ln 4; probs [1, 1, 2, 1] / 5: -(3 * 0.2 ln 0.2 + 0.4 ln 0.4)
    # two logits at 1000 and two at 0: ln 2 (the others have probability ~e^-1000); 4 x 7.0: ln 4
    out = entropy_from_logits(logits)
    assert out.shape == (2, 2)
    assert out[0].tolist() == pytest.approx([math.log(4), -(3 * 0.2 * math.log(0.2) + 0.4 * math.log(0.4))])
    assert out[1].tolist() == pytest.approx([math.log(2), math.log(4)])


# --- KL controllers --------------------------------------------------------------------------


def test_fixed_kl_controller_never_changes():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=512)
    ctl.update(current_kl=0.0, n_steps=512)
    assert ctl.value == 0.05


@pytest.mark.parametrize(
    "kl, expected",
    [
        (6.6, 0.1 * (1 + 0.1 * 256 / 10000)),  # error 6.6/6 - 1 = 0.1, inside the clip: up
        (7.2, 0.1 * (1 + 0.2 * 256 / 10000)),  # error 0.2, at the clip: up
        (60.0, 0.1 * (1 + 0.2 * 256 / 10000)),  # error 9 clipped to 0.2: up
        (6.0, 0.1),  # on target: unchanged
        (5.4, 0.1 * (1 - 0.1 * 256 / 10000)),  # error -0.1: down
        (0.0, 0.1 * (1 - 0.2 * 256 / 10000)),  # error -1 clipped to -0.2: down
    ],
)
def test_adaptive_kl_controller_step(kl, expected):
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.engaged = True  # the KL reached the target before: Ziegler's rule runs both ways
    ctl.update(current_kl=kl, n_steps=256)
    assert ctl.value == pytest.approx(expected, rel=1e-12)
    assert (ctl.value > 0.1) == (kl > 6.0) and (ctl.value < 0.1) == (kl < 6.0)


def test_adaptive_kl_controller_compounds():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=1.0, horizon=100)
    ctl.update(current_kl=1.1, n_steps=10)  # error 0.1: * 1.01
    ctl.update(current_kl=0.5, n_steps=50)  # error -0.5 -> -0.2: * 0.9
    assert ctl.value == pytest.approx(0.2 * 1.01 * 0.9, rel=1e-12)


def test_adaptive_kl_controller_holds_kl_coef_until_the_kl_first_reaches_the_target():
    """Anti-windup: a run starts at KL 0 and the policy needs updates to move; lowering kl_coef
    meanwhile (at the clip, 20% an update at horizon = batch) only lets the KL overshoot."""
    ctl = AdaptiveKLController(init_kl_coef=0.05, target=3.0, horizon=32)
    for kl in (0.0, 0.5, 1.5, 2.9):  # climbing from the reference
        ctl.update(current_kl=kl, n_steps=32)
    assert ctl.value == 0.05 and not ctl.engaged
    ctl.update(current_kl=3.3, n_steps=32)  # reached: error 0.1, * 1.1
    ctl.update(current_kl=1.5, n_steps=32)  # from now on both ways: error -0.5 -> -0.2, * 0.8
    assert ctl.engaged and ctl.value == pytest.approx(0.05 * 1.1 * 0.8, rel=1e-12)


def test_along_a_ramp_the_kl_controller_steers_to_a_goal_that_rises_to_the_target():
    """ppo.kl_ramp: the goal rises linearly from 0 to the target over `ramp_updates`, and the rule
    runs both ways from the first update against it (no hold): the error is (KL - goal) / target."""
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=2.0, horizon=8, ramp_updates=10)
    assert [ctl.goal(u) for u in (1, 5, 10, 20)] == pytest.approx([0.2, 1.0, 2.0, 2.0], rel=1e-12)
    ctl.update(current_kl=0.2, n_steps=8)  # on the goal of update 1 (0.2): unchanged
    assert ctl.value == pytest.approx(0.1, rel=1e-12)
    ctl.update(current_kl=0.0, n_steps=8)  # goal 0.4: error -0.2, x0.8 - lowered before the KL ever reached the target
    ctl.update(current_kl=0.8, n_steps=8)  # goal 0.6: error +0.1, x1.1
    ctl.update(current_kl=3.0, n_steps=8)  # goal 0.8: error 1.1 clipped to 0.2, x1.2
    assert ctl.value == pytest.approx(0.1 * 0.8 * 1.1 * 1.2, rel=1e-12)
    for _ in range(16):  # updates 5-20, each at its goal: no change; past update 10 the goal is the target
        ctl.update(current_kl=ctl.goal(ctl.updates + 1), n_steps=8)
    assert ctl.value == pytest.approx(0.1 * 0.8 * 1.1 * 1.2, rel=1e-12) and ctl.goal(ctl.updates) == 2.0


def test_a_kl_controller_that_cannot_reach_its_target_is_said_at_the_start(capsys):
    """Ziegler's horizon of 10000 samples at the real-model batch of 8: every update at the clip
    moves kl_coef by (1 +- 0.2 x 8 / 10000), 1.6% up over 100 updates - it holds no target."""
    from rlhf.ppo.trainer import PPOConfig, say_if_the_kl_controller_cannot_move

    settings = PPOConfig(batch_size=8, mini_batch_size=1, total_updates=100, kl_coef=0.1, target=6.0, horizon=10000)
    controller = AdaptiveKLController(settings.kl_coef, settings.target, settings.horizon)
    up, down = controller.reach(settings.batch_size, settings.total_updates)
    assert up == pytest.approx(1.00016**100, rel=1e-12) and down == pytest.approx(0.99984**100, rel=1e-12)
    for _ in range(100):  # the controller itself, at the clip every update (above the target: engaged from the first)
        controller.update(current_kl=100.0, n_steps=8)
    assert controller.value == pytest.approx(0.1 * up, rel=1e-9)
    say_if_the_kl_controller_cannot_move(AdaptiveKLController(0.1, 6.0, 10000), settings)
    line = capsys.readouterr().out.strip()
    suggested = 0.2 * 8 / (10 ** (1 / 100) - 1)  # the horizon at which 100 updates can grow it 10x: about 69 samples
    expected = (
        f"ppo: kl_coef cannot follow ppo.target=6.0: over 100 updates of 8 samples, ppo.horizon=10000 lets it move by at most "
        f"x{up:.3f} up and x{down:.3f} down; ppo.horizon={suggested:.0f} lets it grow 10x"
    )
    assert line == expected
    say_if_the_kl_controller_cannot_move(AdaptiveKLController(0.1, 6.0, suggested), settings)
    assert capsys.readouterr().out == ""  # one that can move says nothing
