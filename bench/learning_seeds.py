"""Does each learning claim hold at a second seed? The learning benchmark's runs at two or more
seeds, side by side, and pooled.

    python bench/learning.py --seed 42                   # one JSON per seed (bench/results/<date>-learning-seed_42.json)
    python bench/learning.py --seed 1 --skip-phases
    python bench/learning_seeds.py bench/results/*-learning-seed_42.json bench/results/*-learning-seed_1.json

For each online aligner and each measure - the proxy's gain over SFT, that gain at equal answer
length, the judge's gain and its length-controlled value, the length change and the KL - one row:
each seed's value with its 95% interval over the held-out prompts (as its run reported it), the
value over all seeds with the 95% interval of `rlhf.seeds` (the seed grouping of
`python -m rlhf.compare`: a bootstrap over seeds x prompts of the evaluations' per-prompt rows),
and a verdict: "holds at every seed" when each seed's interval is on the same side of 0, "pooled
only" when only the pooled one is, "does not hold" otherwise. PPO's KL against its target at
each seed follows. Writes <out>/<date>-learning-seeds.json and .md.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from common import ROOT, write_results  # noqa: E402  (bench/ is the script's own folder)

sys.path.insert(0, str(ROOT))
from rlhf.seeds import bootstrap, percentile_interval, pooled_statistic, prompt_statistic  # noqa: E402

ONLINE = ("ppo", "grpo", "rloo")
# measure -> (the benchmark JSON's key after "<aligner>_", the metric whose per-prompt statistic pools the seeds)
MEASURES = {
    "proxy gain": ("eval_score_gain", "eval_score_gain"),
    "proxy gain at equal length": ("eval_score_gain_lc", "eval_score_gain_lc"),
    "judge gain": ("judge_score_gain", "eval_judge_score_gain"),
    "judge gain at equal length": ("judge_score_gain_lc", "eval_judge_score_gain_lc"),
    "length change (tokens)": ("length_change", "eval_length_change"),
    "KL to SFT (nats, temperature 1.0)": ("kl", "eval_kl"),
}
CLAIMS = ("proxy gain", "proxy gain at equal length", "judge gain", "judge gain at equal length")  # gains: a verdict each
KL_TOLERANCE = 0.25  # PPO's KL counts as held when within 25% of its target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="bench/learning.py JSON files, one per seed")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for <date>-learning-seeds.json/.md")
    args = parser.parse_args()
    runs = [json.loads(Path(path).read_text()) for path in args.results]
    problem = check(runs, args.results)
    if problem:
        raise SystemExit(f"error: {problem}")
    summary = summarise(runs)
    write_results(args.out, f"{time.strftime('%Y-%m-%d')}-learning-seeds", summary, markdown(summary))


def check(runs: list, paths: list) -> str | None:
    """Why these files cannot be pooled, or None."""
    if len(runs) < 2:
        return "need the JSONs of at least two seeds"
    seeds = [run.get("seed") for run in runs]
    if len(set(seeds)) != len(seeds):
        return f"two files of the same seed: {dict(zip(paths, seeds))}"
    for path, run in zip(paths, runs):
        if "per_prompt" not in run:
            return f"{path}: no per_prompt rows (written before bench/learning.py kept them); rerun it"
        if run["sizes"] != runs[0]["sizes"] or run["data"] != runs[0]["data"]:
            return f"{path}: other sizes or data than {paths[0]}: its seeds cannot be pooled"
    return None


def summarise(runs: list) -> dict:
    rows = []
    for aligner in ONLINE:
        for measure, (key, metric) in MEASURES.items():
            per_seed = [{"value": run.get(f"{aligner}_{key}"), "ci95": run.get(f"{aligner}_{key}_ci95")} for run in runs]
            statistic = prompt_statistic(metric)
            prompts = [run["per_prompt"][aligner] for run in runs]
            pooled = pooled_statistic(prompts, statistic)
            row = {"aligner": aligner, "measure": measure, "seeds": per_seed, "pooled": pooled}
            row["pooled_ci95"] = percentile_interval(bootstrap(prompts, statistic))
            if measure in CLAIMS:
                row["verdict"] = verdict([seed["ci95"] for seed in per_seed], row["pooled_ci95"])
            rows.append(row)
    kl = [
        {"seed": run["seed"], "ppo_kl": run["ppo_kl"], "target": run["ppo_kl_target"], "kl_coef_final": run.get("ppo_kl_coef_final")}
        for run in runs
    ]
    for entry in kl:
        entry["within_tolerance"] = abs(entry["ppo_kl"] / entry["target"] - 1) <= KL_TOLERANCE
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "seeds": [run["seed"] for run in runs],
        "runs": [{key: run[key] for key in ("seed", "date", "total_seconds", "cpu_flags")} for run in runs],
        "rows": rows,
        "ppo_kl": kl,
    }


def verdict(intervals: list, pooled: list) -> str:
    """'holds at every seed' when every seed's interval is on one side of 0 (the same side),
    'pooled only' when only the pooled interval is, else 'does not hold'."""

    def side(interval):
        return 0 if interval is None or interval[0] <= 0 <= interval[1] else (1 if interval[0] > 0 else -1)

    sides = {side(interval) for interval in intervals}
    if len(sides) == 1 and 0 not in sides:
        return "holds at every seed"
    return "pooled only" if side(pooled) != 0 else "does not hold"


def shown(value, interval=None) -> str:
    text = "n/a" if value is None else f"{value:+.3f}"
    return text + (f" [{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else "")


def markdown(summary: dict) -> str:
    seeds = summary["seeds"]
    lines = [
        f"Seeds {', '.join(str(s) for s in seeds)} of bench/learning.py, pooled {summary['date']} by bench/learning_seeds.py. "
        "Each seed: its value with the 95% t interval over the held-out prompts; pooled: the value over every seed's prompts "
        "with the 95% interval of a bootstrap over seeds x prompts (rlhf.seeds).",
        "",
        "| aligner | measure | " + " | ".join(f"seed {s}" for s in seeds) + " | pooled | verdict |",
        "|---|---|" + "---|" * len(seeds) + "---|---|",
    ]
    for row in summary["rows"]:
        cells = [shown(seed["value"], seed["ci95"]) for seed in row["seeds"]]
        cells.append(shown(row["pooled"], row["pooled_ci95"]))
        lines.append(f"| {row['aligner'].upper()} | {row['measure']} | " + " | ".join(cells) + f" | {row.get('verdict', '')} |")
    lines += ["", "| seed | PPO KL at temperature 1.0 | ppo.target | within 25% | kl_coef at the end |", "|---|---|---|---|---|"]
    for entry in summary["ppo_kl"]:
        lines.append(
            f"| {entry['seed']} | {entry['ppo_kl']:.3f} | {entry['target']:g} | {'yes' if entry['within_tolerance'] else 'no'} | "
            f"{entry['kl_coef_final']} |"
        )
    lines += ["", "| seed | measured | total | CPU flags |", "|---|---|---|---|"]
    lines += [f"| {run['seed']} | {run['date']} | {run['total_seconds'] / 60:.1f} min | {run['cpu_flags']} |" for run in summary["runs"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
