"""Preference metrics: how well a model's scores agree with human preference labels.

Each held-out pair gives a score to the preferred (chosen) and the dispreferred (rejected)
answer: the implicit reward beta * log(pi / ref) for DPO, the reward model's output for RM.
"""

import math
from collections import defaultdict


def preference_metrics(chosen_scores, rejected_scores, prompts) -> dict:
    """win_rate and kendall_tau over pairs; `prompts` (one hashable key per pair) groups the
    pairs that rank answers to the same prompt. (The mean margin is the trainers' own:
    DPO's rewards/margins, the reward model's eval_margin.)"""
    if not (len(chosen_scores) == len(rejected_scores) == len(prompts)) or not prompts:
        raise ValueError("need one chosen score, one rejected score and one prompt key per pair, and some pairs")
    margins = [float(c) - float(r) for c, r in zip(chosen_scores, rejected_scores)]
    return {
        "win_rate": sum(agreement(m) for m in margins) / len(margins),
        "kendall_tau": kendall_tau(margins, prompts),
        "pairs": len(margins),  # how many held-out pairs the rates stand on
    }


def agreement(margin: float) -> float:
    """1 when the model ranks the pair as the labels do, 0 when opposite, 0.5 on a tie."""
    return 1.0 if margin > 0 else 0.0 if margin < 0 else 0.5


def kendall_tau(margins, prompts) -> float:
    """Kendall's tau-a between model scores and preference labels, per prompt, averaged.

    For one prompt, tau = (concordant - discordant) / (labelled pairs): a labelled pair is
    concordant when the model scores the preferred answer higher. When a prompt's pairs are
    every pair of a ranking of n answers this is the full tau over its n(n-1)/2 pairs; with a
    single pair per prompt it reduces to 2 * win_rate - 1.
    """
    per_prompt = defaultdict(list)
    for margin, prompt in zip(margins, prompts):
        per_prompt[prompt].append(2.0 * agreement(margin) - 1.0)  # +1 concordant, -1 discordant, 0 tie
    return sum(sum(signs) / len(signs) for signs in per_prompt.values()) / len(per_prompt)


def wilson_interval(successes: float, trials: int, z: float = 1.96) -> list:
    """[low, high] of the Wilson score interval for a rate of successes / trials (z = 1.96: the
    95% level). A low end above 0.5 means the rate beats a coin flip at that level."""
    if trials <= 0:
        raise ValueError("need at least one trial")
    p = successes / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return [(centre - spread) / (1 + z * z / trials), (centre + spread) / (1 + z * z / trials)]


def wilson_lower_bound(successes: float, trials: int, z: float = 1.96) -> float:
    """The low end of `wilson_interval`."""
    return wilson_interval(successes, trials, z)[0]


def paired_gain(before: list, after: list, prefix: str = "eval_", lengths: tuple | None = None) -> dict:
    """How much a policy's held-out scores moved: the mean of before and after
    (`<prefix>scores_before`, `<prefix>scores`), and the mean paired difference after - before
    (the same prompts, sampled under the same seeds) with its 95% Student t interval over prompts
    (from 2 prompts on), and how many pairs. A gain whose interval includes 0 is not a gain. With
    `lengths` (the answers' lengths before, after) also the gain at equal length
    (`length_controlled_gain`)."""
    if len(before) != len(after) or not before:
        raise ValueError(f"need as many scores after as before, and some: got {len(before)} and {len(after)}")
    means = {f"{prefix}scores_before": sum(before) / len(before), f"{prefix}scores": sum(after) / len(after)}
    controlled = length_controlled_gain(before, after, *lengths, prefix=prefix) if lengths is not None else {}
    return {**means, **score_gain(before, after, prefix=prefix), **controlled, f"{prefix}score_pairs": len(before)}


def length_controlled_gain(before: list, after: list, lengths_before: list, lengths_after: list, prefix: str = "eval_") -> dict:
    """How much of a score gain is not answer length. Reward models favour longer answers, so a
    policy can gain by growing its answers alone. Per prompt, the gain d = after - before is
    regressed on the length change x = length_after - length_before (least squares, d = a + b x):
    `<prefix>score_gain_lc` is a, the gain at zero length change, with `<prefix>score_gain_lc_ci95`
    its 95% t interval (n - 2 degrees of freedom); `<prefix>score_per_token` is b, and
    `<prefix>length_change` the mean length change with its interval. A regression on the length
    difference, the idea of AlpacaEval's length-controlled win rate (Dubois et al. 2024) applied
    to paired scores. Where every length change is the same, a is the mean gain when that change
    is 0 and cannot be told apart from length otherwise (no `_lc` keys then)."""
    if not (len(before) == len(after) == len(lengths_before) == len(lengths_after)) or not before:
        raise ValueError("need one score and one length before and after per prompt, and some prompts")
    gains = [b - a for a, b in zip(before, after)]
    changes = [float(b - a) for a, b in zip(lengths_before, lengths_after)]
    n = len(gains)
    mean_change = sum(changes) / n
    result = {f"{prefix}length_change": mean_change}
    if n > 1:
        result[f"{prefix}length_change_ci95"] = mean_interval(changes)
    spread = sum((x - mean_change) ** 2 for x in changes)
    if spread == 0:
        if mean_change == 0:  # no length changed: the gain is all length-controlled
            result.update({key.replace("score_gain", "score_gain_lc"): value for key, value in score_gain(before, after, prefix).items()})
        return result
    intercept, slope = gain_at_equal_length(gains, changes)
    result.update({f"{prefix}score_gain_lc": intercept, f"{prefix}score_per_token": slope})
    if n > 2:
        residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(changes, gains)) / (n - 2)
        half = t_quantile(0.975, n - 2) * math.sqrt(residual * (1 / n + mean_change**2 / spread))
        result[f"{prefix}score_gain_lc_ci95"] = [intercept - half, intercept + half]
    return result


def gain_at_equal_length(gains: list, changes: list) -> tuple:
    """(a, b) of the least-squares line gain = a + b * length change (`length_controlled_gain`):
    a is the gain at zero length change. Where every change is the same, (the mean gain, 0) if
    that change is 0, else (NaN, NaN): gain and length cannot be told apart."""
    n = len(gains)
    mean_change, mean_gain = sum(changes) / n, sum(gains) / n
    spread = sum((x - mean_change) ** 2 for x in changes)
    if spread == 0:
        return (mean_gain, 0.0) if mean_change == 0 else (math.nan, math.nan)
    slope = sum((x - mean_change) * (y - mean_gain) for x, y in zip(changes, gains)) / spread
    return mean_gain - slope * mean_change, slope


def score_gain(before: list, after: list, prefix: str = "eval_") -> dict:
    """`<prefix>score_gain`: the mean paired difference after - before, and from 2 pairs on
    `<prefix>score_gain_ci95`, its 95% Student t interval."""
    differences = [b - a for a, b in zip(before, after)]
    gain = {f"{prefix}score_gain": sum(differences) / len(differences)}
    if len(differences) > 1:
        gain[f"{prefix}score_gain_ci95"] = mean_interval(differences)
    return gain


def mean_interval(values: list, level: float = 0.95) -> list:
    """[low, high]: the Student t confidence interval of the mean of `values` (at least 2)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {n}")
    mean = sum(values) / n
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    half = t_quantile(0.5 + level / 2, n - 1) * spread
    return [mean - half, mean + half]


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with `df` degrees of freedom, by bisection on its
    distribution function."""
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def student_t_cdf(x: float, df: int) -> float:
    """P(T <= x) for x >= 0: 1/2 plus the density integrated from 0 to x (Simpson's rule on 2000
    intervals; the density is smooth, so the error is far below the digits an interval shows).
    density(t) = Gamma((df + 1) / 2) / (sqrt(df pi) Gamma(df / 2)) (1 + t^2 / df)^(-(df + 1) / 2)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t):
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    steps, width = 2000, x / 2000
    inner = sum((4 if i % 2 else 2) * density(i * width) for i in range(1, steps))
    return 0.5 + width / 3 * (density(0.0) + inner + density(x))


def is_number(value) -> bool:
    """A real number a table or curve can show: not a bool, not NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
