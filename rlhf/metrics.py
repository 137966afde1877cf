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


def wilson_lower_bound(successes: float, trials: int, z: float = 1.96) -> float:
    """Lower end of the Wilson score interval for a rate of successes / trials (z = 1.96: the
    95% level). Above 0.5 means the rate beats a coin flip at that level."""
    if trials <= 0:
        raise ValueError("need at least one trial")
    p = successes / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return (centre - spread) / (1 + z * z / trials)
