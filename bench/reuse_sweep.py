"""What sharing upstream steps saves a sweep: `experiment=rlhf_chain ppo.kl_coef=0.05,0.1,0.2 -m`
against one chain of the same sizes; the same sweep with two jobs at once
(`hydra/launcher=joblib hydra.launcher.n_jobs=2`, `--joblib`) and with `reuse=false`
(`--without-reuse`), each as one `train.py` process, `--repeats` times.

    python bench/reuse_sweep.py --repeats 3                      # tiny model, every variant
    python bench/reuse_sweep.py --model smollm2-135m --steps 2 --ppo-updates 1 --no-without-reuse --no-joblib

Each measurement uses a seed of its own, so that nothing one trained is reused by another; the
sweep's jobs share theirs, as a user's sweep does. Writes bench/results/<date>-reuse-<model>.json
and .md: every wall time, and per variant its median and range over the repeats.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_flags, machine, timed, write_results  # noqa: E402  (bench/ is the script's own folder)

VARIANTS = ("chain", "sweep", "sweep_joblib", "sweep_without_reuse")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=20, help="SFT and RM optimizer steps")
    parser.add_argument("--ppo-updates", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="further overrides for every step")
    parser.add_argument("--without-reuse", action=argparse.BooleanOptionalAction, default=True, help="also time the sweep with reuse=false")
    parser.add_argument("--joblib", action=argparse.BooleanOptionalAction, default=True, help="also time the sweep two jobs at a time")
    parser.add_argument("--repeats", type=int, default=1, help="times each variant runs (each with seeds of its own)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    sizes = [f"model={args.model}", f"sft.max_steps={args.steps}", f"rm.max_steps={args.steps}", f"ppo.total_updates={args.ppo_updates}"]
    sizes += ["sft.save_strategy=no", "rm.save_strategy=no", "ppo.save_steps=0", *args.set]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "cpu_flags": cpu_flags(), "model": args.model, "sizes": sizes}
    command = [sys.executable, "train.py", "experiment=rlhf_chain", *sizes]
    sweep = [*command, "ppo.kl_coef=0.05,0.1,0.2", "-m"]
    variants = {
        "chain": command,
        "sweep": sweep,
        "sweep_joblib": [*sweep, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if args.joblib else None,
        "sweep_without_reuse": [*sweep, "reuse=false"] if args.without_reuse else None,
    }
    seconds = {name: [] for name, line in variants.items() if line}
    trained = {}
    with tempfile.TemporaryDirectory(prefix="rlhf-reuse-") as work:
        for repeat in range(args.repeats):
            for index, name in enumerate(seconds):
                seed = 1000 + 10 * repeat + index  # nothing trained in one measurement is reused by another
                where = Path(work) / f"{name}-{repeat}"
                directory = f"hydra.run.dir={where}" if name == "chain" else f"hydra.sweep.dir={where}"
                wall, _ = timed([*variants[name], f"seed={seed}", directory], env)
                seconds[name].append(wall)
                if name != "chain":  # how many jobs trained each step (the others reused it)
                    trained[f"{name}-{repeat}"] = {
                        step: sum("reused_from" not in json.loads((where / job / step / "status.json").read_text()) for job in "012")
                        for step in ("sft", "rm", "ppo")
                    }
    result["seconds"], result["trained_steps"] = seconds, trained
    result["median_seconds"] = {name: statistics.median(values) for name, values in seconds.items()}
    chain = result["median_seconds"]["chain"]
    labels = {
        "chain": "one chain (SFT -> RM -> PPO)",
        "sweep": "3-job ppo.kl_coef sweep, upstream reused",
        "sweep_joblib": "the same, joblib n_jobs=2",
        "sweep_without_reuse": "the same sweep, reuse=false",
    }
    lines = [
        f"# Sharing upstream steps in a sweep ({result['date']}, {args.model})",
        "",
        f"{result['machine']}; CPU flags: {result['cpu_flags']}",
        f"Sizes: {' '.join(sizes)}; {args.repeats} run(s) of each",
        "",
        "| what (one train.py process each) | median wall seconds [min, max] | median / chain |",
        "|---|---|---|",
    ]
    for name, values in seconds.items():
        median = result["median_seconds"][name]
        lines.append(f"| {labels[name]} | {median:.0f} [{min(values):.0f}, {max(values):.0f}] | {median / chain:.2f} |")
    lines += ["", f"Jobs that trained each step (of 3; the others reused it): {trained}", ""]
    write_results(args.out, f"{result['date'][:10]}-reuse-{args.model}", result, "\n".join(lines))


if __name__ == "__main__":
    main()
