"""Is a sweep's winner real? Runs whose overrides differ only in `seed=` form a group; each
group gets its mean with a 95% interval, and each group against the next best the interval of
their difference, marked "within noise" when it crosses 0 (`python -m rlhf.compare` prints them,
writes compare_seeds.csv and puts them in report.html).

Where every run of a group left one row per prompt (stage=eval's samples.jsonl) and the metric is
a statistic of those rows (a score gain, its length-controlled value, a win rate, the KL), the
interval accounts for both sources of noise: a bootstrap over seeds x prompts (draw the seeds
with replacement, and the prompts with replacement - once for all seeds where they answered the
same prompts, a crossed design; Davison & Hinkley 1997 on resampling in two stages). With few seeds it is still narrower than the truth (a
2-seed group's seed draws can only repeat what the two seeds did). Otherwise each seed's run
contributes its value and the interval is Student's t over the seeds (each value carries its own
prompts' noise, so the spread covers both), the difference Welch's; with 2 seeds that interval
has 1 degree of freedom and is wide: that is what 2 seeds can tell.
"""

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from rlhf import report
from rlhf.metrics import agreement, gain_at_equal_length, is_number, mean_interval, t_quantile

SEED_CSV_NAME = "compare_seeds.csv"
SEED_COLUMNS = (
    "group",
    "seeds",
    "metric",
    "mean",
    "ci95_low",
    "ci95_high",
    "interval",
    "vs_next",
    "difference",
    "diff_ci95_low",
    "diff_ci95_high",
    "verdict",
)
BOOTSTRAP = "bootstrap over seeds x prompts"
T_OVER_SEEDS = "t over seeds"
DRAWS = 2000  # bootstrap draws: over 20 bootstrap seeds, 2 seeds x 128 prompts, an end's sd was 1.4% of the interval's width
PROMPT_ROWS = "samples.jsonl"  # one row per held-out prompt, as stage=eval writes it


@dataclass
class SeedGroup:
    label: str  # the overrides its runs share
    values: list  # the metric of each seed's run
    mean: float
    interval: list  # 95% interval of the mean
    method: str  # BOOTSTRAP or T_OVER_SEEDS
    draws: list | None = None  # the bootstrap's statistics (BOOTSTRAP): differences are drawn from them


def seed_of(overrides: list) -> str:
    found = [item.split("=", 1)[1] for item in overrides if item.lstrip("+").startswith("seed=")]
    return found[-1] if found else "default"


def prompt_statistic(metric: str):
    """The function of a run's per-prompt rows that `metric` is, or None: eval_[judge_]score_gain,
    eval_[judge_]score_gain_lc, eval_[judge_]win_rate, eval_kl and eval_length_change."""
    found = re.fullmatch(r"eval_(judge_|)(score_gain|score_gain_lc|win_rate)", metric)
    if found is None:
        column = {"eval_kl": lambda row: row["kl"], "eval_length_change": lambda row: row["length_policy"] - row["length_reference"]}
        one = column.get(metric)
        return None if one is None else (lambda rows: sum(one(row) for row in rows) / len(rows))
    judge, what = found.groups()
    policy, reference = f"score_{judge}policy", f"score_{judge}reference"
    if what == "score_gain":
        return lambda rows: sum(row[policy] - row[reference] for row in rows) / len(rows)
    if what == "win_rate":
        return lambda rows: sum(agreement(row[policy] - row[reference]) for row in rows) / len(rows)

    def controlled(rows):  # the gain at zero length change, without length_controlled_gain's intervals (a bootstrap calls it often)
        gains = [row[policy] - row[reference] for row in rows]
        return gain_at_equal_length(gains, [row["length_policy"] - row["length_reference"] for row in rows])[0]

    return controlled


def prompt_rows(run_dir: Path) -> list | None:
    """A run's per-prompt rows (samples.jsonl), or None where it has none or they cannot be read."""
    try:
        lines = (Path(run_dir) / PROMPT_ROWS).read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()] or None
    except (OSError, ValueError):
        return None


def bootstrap(per_seed: list, statistic, draws: int = DRAWS, seed: int = 0) -> list:
    """`statistic` of `draws` resamples over seeds x prompts, each pooling the rows of
    len(per_seed) seeds drawn with replacement. Where every seed answered the same prompts (the
    same held-out split: a crossed design) one draw of prompt positions serves every drawn seed,
    so that a prompt hard for every seed counts as one prompt, not as one per seed; otherwise each
    drawn seed's rows are drawn on their own. Seeded: the same runs give the same interval."""
    rng = random.Random(seed)
    crossed = len({len(rows) for rows in per_seed}) == 1 and all(
        [row.get("prompt") for row in rows] == [row.get("prompt") for row in per_seed[0]] for rows in per_seed
    )
    values = []
    for _ in range(draws):
        seeds = rng.choices(per_seed, k=len(per_seed))
        if crossed:
            positions = rng.choices(range(len(per_seed[0])), k=len(per_seed[0]))
            pooled = [rows[i] for rows in seeds for i in positions]
        else:
            pooled = [row for rows in seeds for row in rng.choices(rows, k=len(rows))]
        values.append(statistic(pooled))
    return values


def percentile_interval(values: list, level: float = 0.95) -> list:
    """[low, high]: the (1 - level) / 2 and (1 + level) / 2 points of `values` (NaNs dropped)."""
    ordered = sorted(v for v in values if v == v)
    if not ordered:
        return [math.nan, math.nan]
    at = lambda p: ordered[min(len(ordered) - 1, max(0, round(p * (len(ordered) - 1))))]  # noqa: E731
    return [at((1 - level) / 2), at((1 + level) / 2)]


def seed_groups(runs, metric: str, ascending: bool) -> list:
    """The groups of runs (each with .overrides, .metrics and .path) whose overrides differ only
    in `seed=`, with at least two seeds that report `metric`, best mean first."""
    members = {}
    for run in runs:
        if is_number(run.metrics.get(metric)):
            label = " ".join(item for item in run.overrides if not item.lstrip("+").startswith("seed=")) or "(defaults)"
            members.setdefault(label, {})[seed_of(run.overrides)] = run  # one run per seed
    statistic = prompt_statistic(metric)
    groups = []
    for label, by_seed in members.items():
        if len(by_seed) < 2:
            continue
        values = [run.metrics[metric] for run in by_seed.values()]
        per_seed = [prompt_rows(run.path) for run in by_seed.values()] if statistic is not None else [None]
        pooled = pooled_statistic(per_seed, statistic)
        if pooled is not None:
            draws = bootstrap(per_seed, statistic)
            groups.append(SeedGroup(label, values, pooled, percentile_interval(draws), BOOTSTRAP, draws))
        else:
            groups.append(SeedGroup(label, values, sum(values) / len(values), mean_interval(values), T_OVER_SEEDS))
    return sorted(groups, key=lambda group: group.mean, reverse=not ascending)


def pooled_statistic(per_seed: list, statistic) -> float | None:
    """`statistic` of every seed's rows together; None where a seed left no rows or its rows lack
    what the statistic reads (an evaluation without a judge, one written before lengths were kept)."""
    if any(rows is None for rows in per_seed):
        return None
    try:
        return statistic([row for rows in per_seed for row in rows])
    except (KeyError, TypeError):
        return None


def difference(first: SeedGroup, second: SeedGroup) -> tuple:
    """(mean of first - mean of second, its 95% interval): from the two groups' bootstrap draws,
    which are independent, where both have them; else Welch's (the seeds of each group are
    independent draws, with variances of their own)."""
    gap = first.mean - second.mean
    if first.draws is not None and second.draws is not None:
        return gap, percentile_interval([a - b for a, b in zip(first.draws, second.draws)])

    def share(group):  # variance of the group's mean
        n = len(group.values)
        centre = sum(group.values) / n
        return sum((v - centre) ** 2 for v in group.values) / (n - 1) / n

    v1, v2 = share(first), share(second)
    if v1 + v2 == 0:
        return gap, [gap, gap]
    freedom = (v1 + v2) ** 2 / (v1**2 / (len(first.values) - 1) + v2**2 / (len(second.values) - 1))
    half = t_quantile(0.975, freedom) * math.sqrt(v1 + v2)
    return gap, [gap - half, gap + half]


def seed_rows(groups: list, metric: str) -> list:
    """One row per group (SEED_COLUMNS): its mean and interval (and how it was computed), and its
    difference from the next best group with that interval and the verdict."""
    rows = []
    for index, group in enumerate(groups):
        row = {"group": group.label, "seeds": len(group.values), "metric": metric, "mean": group.mean, "interval": group.method}
        row.update({"ci95_low": group.interval[0], "ci95_high": group.interval[1]})
        if index + 1 < len(groups):
            gap, (low, high) = difference(group, groups[index + 1])
            verdict = "within noise" if low <= 0 <= high else "beyond noise"
            row.update({"vs_next": groups[index + 1].label, "difference": gap, "diff_ci95_low": low, "diff_ci95_high": high})
            row["verdict"] = verdict
        rows.append({column: row.get(column) for column in SEED_COLUMNS})
    return rows


def format_seed_rows(rows: list, metric: str) -> str:
    lines = [f"runs that differ only in their seed: {metric}, mean over the seeds [95% interval]"]
    for row in rows:
        interval = f"[{row['ci95_low']:.4g}, {row['ci95_high']:.4g}]"
        lines.append(f"  {row['group']}: {row['seeds']} seeds, {row['mean']:.4g} {interval} ({row['interval']})")
        if row["vs_next"] is not None:
            gap = f"{row['difference']:+.4g} [{row['diff_ci95_low']:.4g}, {row['diff_ci95_high']:.4g}]"
            lines.append(f"    - {row['vs_next']}: {gap}, {row['verdict']}")
    return "\n".join(lines)


def write_seed_csv(rows: list, path: Path) -> None:
    report.write_csv(path, SEED_COLUMNS, rows)
