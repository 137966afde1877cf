"""What sharing upstream steps saves a sweep: `experiment=rlhf_chain ppo.kl_coef=0.05,0.1,0.2 -m`
against one chain of the same sizes, and (tiny model only, `--without-reuse`) the same sweep
with `reuse=false`, each as one `train.py` process.

    python bench/reuse_sweep.py                                  # tiny model, with the sweep without reuse
    python bench/reuse_sweep.py --model smollm2-135m --steps 4 --ppo-updates 2 --no-without-reuse

Each measurement uses a seed of its own, so that nothing one trained is reused by another; the
sweep's jobs share theirs, as a user's sweep does. Writes bench/results/<date>-reuse-<model>.json and .md.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_flags, machine, timed, write_results  # noqa: E402  (bench/ is the script's own folder)

SEEDS = {"chain": 1001, "sweep": 1002, "sweep_without_reuse": 1003}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=20, help="SFT and RM optimizer steps")
    parser.add_argument("--ppo-updates", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="further overrides for every step")
    parser.add_argument("--without-reuse", action=argparse.BooleanOptionalAction, default=True, help="also time the sweep with reuse=false")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    sizes = [f"model={args.model}", f"sft.max_steps={args.steps}", f"rm.max_steps={args.steps}", f"ppo.total_updates={args.ppo_updates}"]
    sizes += ["sft.save_strategy=no", "rm.save_strategy=no", "ppo.save_steps=0", *args.set]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "cpu_flags": cpu_flags(), "model": args.model, "sizes": sizes}
    with tempfile.TemporaryDirectory(prefix="rlhf-reuse-") as work:
        work = Path(work)
        command = [sys.executable, "train.py", "experiment=rlhf_chain", *sizes]
        result["chain_seconds"], _ = timed([*command, f"seed={SEEDS['chain']}", f"hydra.run.dir={work / 'chain'}"], env)
        sweep = [*command, "ppo.kl_coef=0.05,0.1,0.2", "-m"]
        result["sweep_seconds"], _ = timed([*sweep, f"seed={SEEDS['sweep']}", f"hydra.sweep.dir={work / 'sweep'}"], env)
        result["trained_in_sweep"] = {
            step: sum("reused_from" not in json.loads((work / "sweep" / job / step / "status.json").read_text()) for job in "012")
            for step in ("sft", "rm", "ppo")
        }
        if args.without_reuse:
            plain = [*sweep, "reuse=false", f"seed={SEEDS['sweep_without_reuse']}", f"hydra.sweep.dir={work / 'plain'}"]
            result["sweep_without_reuse_seconds"], _ = timed(plain, env)
    result["sweep_over_chain"] = result["sweep_seconds"] / result["chain_seconds"]
    lines = [
        f"# Sharing upstream steps in a sweep ({result['date']}, {args.model})",
        "",
        f"{result['machine']}; CPU flags: {result['cpu_flags']}",
        f"Sizes: {' '.join(sizes)}",
        "",
        "| what (one train.py process each) | wall seconds |",
        "|---|---|",
        f"| one chain (SFT -> RM -> PPO) | {result['chain_seconds']:.0f} |",
        f"| 3-job ppo.kl_coef sweep, upstream reused | {result['sweep_seconds']:.0f} ({result['sweep_over_chain']:.2f} x the chain) |",
    ]
    if "sweep_without_reuse_seconds" in result:
        ratio = result["sweep_without_reuse_seconds"] / result["chain_seconds"]
        lines.append(f"| the same sweep with reuse=false | {result['sweep_without_reuse_seconds']:.0f} ({ratio:.2f} x the chain) |")
    lines += ["", f"Steps trained in the sweep (of 3 each): {result['trained_in_sweep']}", ""]
    write_results(args.out, f"{result['date'][:10]}-reuse-{args.model}", result, "\n".join(lines))


if __name__ == "__main__":
    main()
