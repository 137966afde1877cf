"""Measure the framework on this machine; writes bench/results/<date>.json and .md.

    python bench/run.py                 # the tiny default model, about 5 minutes on 2 CPU cores
    python bench/run.py --steps 60

a. overhead: `train.py` SFT and DPO against bench/plain_trl.py (the same TRL trainer by hand):
   the ratio of training-phase time (the trainer's train_runtime) and of whole-process time;
b. start-up: `train.py --cfg job` (composes the config, must not import torch);
c. memory: peak RSS of DPO with LoRA (adapter-disabled reference) against SFT with LoRA;
d. the reference log-prob cache: each job of a 3-point beta sweep, the first (computes the
   reference log-probs) against the later ones (load them);
e. PPO: time per update in generation, policy/value forward, reference forward, scoring and
   optimisation, and tokens generated per second.
Each process runs with /usr/bin/time for its peak RSS; numbers are medians where repeated.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(command: list, env: dict) -> tuple:
    """(wall seconds, peak RSS in MiB) of one process."""
    rss_file = Path(tempfile.mktemp())
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *command], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    rss = int(rss_file.read_text().split()[-1]) / 1024
    rss_file.unlink()
    return seconds, rss


def framework_run(stage: str, steps: int, work: Path, env: dict, *extra) -> dict:
    run_dir = work / f"{stage}-{len(list(work.iterdir()))}"
    seconds, rss = timed([sys.executable, "train.py", f"stage={stage}", f"{stage}.max_steps={steps}", "dataset.test_size=0",
                          f"{stage}.save_strategy=no", f"hydra.run.dir={run_dir}", *extra], env)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"process_seconds": seconds, "peak_rss_mib": rss, "metrics": metrics}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per training run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    env = {**os.environ, "RLHF_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    os.environ["RLHF_CACHE"] = env["RLHF_CACHE"]
    from rlhf.models import ensure_tiny_model

    model_dir = ensure_tiny_model()
    runs = work / "runs"
    runs.mkdir()
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
              f"{platform.platform()}", "python": platform.python_version(), "steps": args.steps}

    # a. overhead against plain TRL
    data = {"sft": ROOT / "rlhf/data/builtin/sft_zh.jsonl", "dpo": ROOT / "rlhf/data/builtin/preference_zh.jsonl"}
    for stage in ("sft", "dpo"):
        ours = framework_run(stage, args.steps, runs, env)
        plain_out = work / f"plain-{stage}.json"
        plain_seconds, plain_rss = timed([sys.executable, "bench/plain_trl.py", "--stage", stage, "--model", str(model_dir),
                                          "--data", str(data[stage]), "--steps", str(args.steps), "--out", str(plain_out)], env)
        plain = json.loads(plain_out.read_text())
        result[f"overhead_{stage}"] = {
            "train_runtime_framework": ours["metrics"]["train_runtime"],
            "train_runtime_plain_trl": plain["train_runtime"],
            "training_ratio": ours["metrics"]["train_runtime"] / plain["train_runtime"],
            "process_seconds_framework": ours["process_seconds"],
            "process_seconds_plain_trl": plain_seconds,
            "process_ratio": ours["process_seconds"] / plain_seconds,
            "peak_rss_mib_framework": ours["peak_rss_mib"],
            "peak_rss_mib_plain_trl": plain_rss,
        }

    # b. start-up of a config-only command
    startups = [timed([sys.executable, "train.py", "--cfg", "job"], env)[0] for _ in range(5)]
    result["startup_cfg_job_seconds"] = statistics.median(startups)

    # c. memory: DPO keeps no second model copy under LoRA
    result["peak_rss_mib"] = {
        "sft_lora": result["overhead_sft"]["peak_rss_mib_framework"],
        "dpo_lora": result["overhead_dpo"]["peak_rss_mib_framework"],
        "ratio": result["overhead_dpo"]["peak_rss_mib_framework"] / result["overhead_sft"]["peak_rss_mib_framework"],
    }

    # d. the reference log-prob cache over a 3-point beta sweep (jobs as separate processes)
    shutil.rmtree(Path(env["RLHF_CACHE"]) / "ref_logps", ignore_errors=True)
    sweep = [framework_run("dpo", args.steps, runs, env, f"dpo.beta={beta}") for beta in (0.1, 0.2, 0.3)]
    first, later = sweep[0]["process_seconds"], statistics.mean(job["process_seconds"] for job in sweep[1:])
    result["ref_cache_sweep"] = {"job_seconds": [job["process_seconds"] for job in sweep],
                                 "later_vs_first": later / first, "later_jobs_faster_by": 1 - later / first}

    # e. PPO timing: a short SFT -> RM -> PPO chain
    chain_dir = runs / "chain"
    timed([sys.executable, "train.py", "experiment=rlhf_chain", f"hydra.run.dir={chain_dir}", f"sft.max_steps={args.steps}",
           f"rm.max_steps={args.steps}", "ppo.total_updates=10"], env)
    ppo = json.loads((chain_dir / "ppo" / "metrics.json").read_text())
    result["ppo"] = {key: value for key, value in ppo.items() if key.startswith("time/")}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / time.strftime("%Y-%m-%d-%H%M")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    shutil.rmtree(work, ignore_errors=True)


def markdown(r: dict) -> str:
    lines = [f"Measured {r['date']} on {r['machine']}, Python {r['python']}, tiny model, {r['steps']} steps per run.", "",
             "| measure | value |", "|---|---|"]
    for stage in ("sft", "dpo"):
        o = r[f"overhead_{stage}"]
        lines.append(f"| {stage.upper()} training-phase time, framework / plain TRL | {o['train_runtime_framework']:.2f} s / "
                     f"{o['train_runtime_plain_trl']:.2f} s = {o['training_ratio']:.3f} |")
        lines.append(f"| {stage.upper()} whole process, framework / plain TRL | {o['process_seconds_framework']:.1f} s / "
                     f"{o['process_seconds_plain_trl']:.1f} s = {o['process_ratio']:.3f} |")
    lines.append(f"| `train.py --cfg job` start-up (median of 5) | {r['startup_cfg_job_seconds']:.2f} s |")
    m = r["peak_rss_mib"]
    lines.append(f"| peak RSS, DPO+LoRA / SFT+LoRA | {m['dpo_lora']:.0f} MiB / {m['sft_lora']:.0f} MiB = {m['ratio']:.2f} |")
    c = r["ref_cache_sweep"]
    jobs = ", ".join(f"{s:.1f}" for s in c["job_seconds"])
    lines.append(f"| beta sweep jobs (first computes the reference, later load it) | {jobs} s; later {c['later_jobs_faster_by']:.0%} faster |")
    for key, value in r["ppo"].items():
        lines.append(f"| PPO {key} | {value:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
