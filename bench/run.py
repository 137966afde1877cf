"""Measure the framework on the machine it runs on; writes bench/results/<date>-<model>.json and .md.

    python bench/run.py                                  # the tiny default model, 5 min 20 s on 2 CPU cores
    python bench/run.py --model smollm2-135m --steps 8 --sweep-pairs 128 --ppo-updates 2 --repeats 1   # a real 135M model, 27 minutes

a. overhead: `train.py` SFT and DPO against bench/plain_trl.py (the same TRL trainer by hand,
   TRL's defaults for what a user would not set, precision included): the ratio of
   training-phase time (the trainer's train_runtime) and of whole-process time;
b. start-up: `train.py --cfg job` (composes the config, must not import torch);
c. memory: peak RSS of DPO with LoRA (adapter-disabled reference) against SFT with LoRA, both
   with as many sequences per step, so the difference is what DPO keeps besides (no model copy);
d. the reference log-prob cache: a 3-point beta sweep run as users run it (one `-m` process),
   each job's stage time, the first (computes the reference log-probs) against the later ones
   (load them). Each job trains one epoch over --sweep-pairs pairs;
e. PPO: time per update in generation, policy/value forward, reference forward, scoring and
   optimisation, and tokens generated per second, from a short SFT -> RM -> PPO chain;
f. GRPO and RLOO from that chain's SFT policy and reward model, as many updates of as many
   sampled responses as PPO: time per update by phase, tokens generated per second, and the
   held-out reward-model score gain per minute of updates, beside PPO's.
Each process runs under /usr/bin/time for its peak RSS, with a fresh model cache; (a) alternates
framework and plain runs `--repeats` times and reports medians.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, matmul_peak_gflops, mfu, timed, train, trained_tokens, write_results  # noqa: E402  (bench/ is the script's own folder)

PAIRS_PER_STEP = 16  # DPO pairs per optimizer step
BATCH = {"sft": 2 * PAIRS_PER_STEP, "dpo": PAIRS_PER_STEP}  # rows per step: both stages see as many sequences
sys.path.insert(0, str(ROOT))
from rlhf.cache import REFERENCE_LOGPS  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a conf/model option: tiny (default) or smollm2-135m")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per SFT/DPO/RM run of (a), (c) and (e)")
    parser.add_argument("--sweep-pairs", type=int, default=576, help="pairs each sweep job of (d) trains on, once each")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each overhead measurement (medians reported)")
    parser.add_argument("--ppo-updates", type=int, default=10, help="PPO updates in the timed chain")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for <date>-<model>.json/.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    try:
        measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # it holds a model cache of its own


def measure(args, work: Path) -> None:
    env = {**os.environ, "RLHF_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    os.environ.update(RLHF_CACHE=env["RLHF_CACHE"], HF_HUB_OFFLINE="1")
    from omegaconf import OmegaConf

    from rlhf.models import resolve_model_path

    # Build or convert the model into the fresh cache first, so that no timed run pays for it.
    conf = ROOT / "conf"  # a model file over the keys every model file shares (its defaults list, read without Hydra)
    model_dir = resolve_model_path(
        OmegaConf.merge(OmegaConf.load(conf / "base" / "model.yaml"), OmegaConf.load(conf / "model" / f"{args.model}.yaml"))
    )
    runs = work / "runs"
    runs.mkdir()
    sweep_steps = max(1, args.sweep_pairs // PAIRS_PER_STEP)  # one epoch: the reference pass covers what is trained
    started, start = time.localtime(), time.perf_counter()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M", started),
        "machine": machine(),
        "python": platform.python_version(),
        "model": args.model,
        "steps": args.steps,
        "sweep_pairs": sweep_steps * PAIRS_PER_STEP,
        "ppo_updates": args.ppo_updates,
        "repeats": args.repeats,
    }
    common = {
        stage: [f"{stage}.per_device_train_batch_size={batch}", f"{stage}.gradient_accumulation_steps=1", "dataset.test_size=0"]
        for stage, batch in BATCH.items()
    }
    import torch

    # MFU is measured against the peak of the precision a run computes in (env.json's precision).
    peaks = {"float32": matmul_peak_gflops("float32"), "bfloat16": matmul_peak_gflops("bfloat16")}
    result["matmul_peak_gflops"] = peaks["float32"]
    result["matmul_peak_gflops_bfloat16"] = peaks["bfloat16"]
    result["threads"] = torch.get_num_threads()

    # a. overhead against plain TRL; c. memory (SFT sees as many sequences per step as DPO's pairs hold)
    data = {"sft": ROOT / "rlhf/data/builtin/sft_zh.jsonl", "dpo": ROOT / "rlhf/data/builtin/preference_zh.jsonl"}
    for stage, batch in BATCH.items():
        runs_of = {"framework": [], "plain": []}
        for repeat in range(args.repeats):  # alternating, so that a slow spell of the machine hits both
            shutil.rmtree(Path(env["RLHF_CACHE"]) / REFERENCE_LOGPS, ignore_errors=True)  # both compute the reference pass
            ours = train(
                runs / f"{stage}-{repeat}",
                env,
                f"model={args.model}",
                f"stage={stage}",
                f"{stage}.max_steps={args.steps}",
                f"{stage}.save_strategy=no",
                *common[stage],
            )
            runs_of["framework"].append(
                {
                    "train_runtime": ours["metrics"]["train_runtime"],
                    **ours,
                    "reference_logps": ours["metrics"].get("time/reference_logps", 0.0),
                }
            )
            plain_out = work / f"plain-{stage}-{repeat}.json"
            seconds, rss = timed(
                [
                    sys.executable,
                    "bench/plain_trl.py",
                    "--stage",
                    stage,
                    "--model",
                    model_dir,
                    "--data",
                    str(data[stage]),
                    "--batch",
                    str(batch),
                    "--steps",
                    str(args.steps),
                    "--out",
                    str(plain_out),
                ],
                env,
            )
            plain = json.loads(plain_out.read_text())
            runs_of["plain"].append({"train_runtime": plain["train_runtime"], "process_seconds": seconds, "peak_rss_mib": rss})
            result[f"{stage}_plain_trl_bf16"] = plain["bf16"]
        median = {
            side: {key: statistics.median(run[key] for run in measured) for key in ("train_runtime", "process_seconds", "peak_rss_mib")}
            for side, measured in runs_of.items()
        }
        ours, plain = median["framework"], median["plain"]
        result[f"overhead_{stage}"] = {
            "train_runtime_framework": ours["train_runtime"],
            "train_runtime_plain_trl": plain["train_runtime"],
            "training_ratio": ours["train_runtime"] / plain["train_runtime"],
            "process_seconds_framework": ours["process_seconds"],
            "process_seconds_plain_trl": plain["process_seconds"],
            "process_ratio": ours["process_seconds"] / plain["process_seconds"],
            "peak_rss_mib_framework": ours["peak_rss_mib"],
            "peak_rss_mib_plain_trl": plain["peak_rss_mib"],
        }
        # f. model-FLOP utilisation of the framework's training phase against the machine's matmul peak
        sequences = args.steps * batch * (2 if stage == "dpo" else 1)  # a DPO pair is two sequences
        tokens = trained_tokens(runs / f"{stage}-0")
        precision = json.loads((runs / f"{stage}-0" / "env.json").read_text())["precision"]
        result[f"{stage}_precision"] = precision
        result[f"{stage}_trained_tokens"] = tokens
        peak = peaks["bfloat16" if "bfloat16 autocast" in precision else "float32"]
        result[f"{stage}_mfu"] = mfu(model_dir, tokens, sequences, ours["train_runtime"], peak)
        if stage == "dpo":  # where the framework's DPO process time goes besides training
            result["overhead_dpo"]["reference_logps_seconds_framework"] = statistics.median(
                run["reference_logps"] for run in runs_of["framework"]
            )

    # b. start-up of a config-only command
    startups = [timed([sys.executable, "train.py", "--cfg", "job"], env)[0] for _ in range(5)]
    result["startup_cfg_job_seconds"] = statistics.median(startups)

    # c. memory: DPO keeps no second model copy under LoRA (the peak RSS of the runs of a.)
    result["peak_rss_ratio_dpo_over_sft"] = (
        result["overhead_dpo"]["peak_rss_mib_framework"] / result["overhead_sft"]["peak_rss_mib_framework"]
    )

    # d. the reference log-prob cache: a 3-point beta sweep as users run it, one `-m` process;
    # a job's time is its stage_runtime (model loading to saved result; imports are paid once per process)
    shutil.rmtree(Path(env["RLHF_CACHE"]) / REFERENCE_LOGPS, ignore_errors=True)
    sweep_dir = runs / "sweep"
    sweep_seconds, _ = timed(
        [
            sys.executable,
            "train.py",
            "-m",
            "reuse=false",  # timings of training, never of a copy
            f"model={args.model}",
            "stage=dpo",
            "dpo.beta=0.1,0.2,0.3",
            f"dpo.max_steps={sweep_steps}",
            "dpo.save_strategy=no",
            *common["dpo"],
            f"dataset.max_samples={sweep_steps * PAIRS_PER_STEP}",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        env,
    )
    jobs = [json.loads((sweep_dir / str(job) / "metrics.json").read_text()) for job in range(3)]
    first, later = jobs[0]["stage_runtime"], statistics.mean(job["stage_runtime"] for job in jobs[1:])
    result["ref_cache_sweep"] = {
        "job_seconds": [job["stage_runtime"] for job in jobs],
        "reference_logps_seconds": [job["time/reference_logps"] for job in jobs],
        "process_seconds": sweep_seconds,
        "later_jobs_faster_by": 1 - later / first,
    }

    # e. PPO timing: a short SFT -> RM -> PPO chain
    chain_dir = runs / "chain"
    timed(
        [
            sys.executable,
            "train.py",
            "reuse=false",
            f"model={args.model}",
            "experiment=rlhf_chain",
            f"hydra.run.dir={chain_dir}",
            f"sft.max_steps={args.steps}",
            f"rm.max_steps={args.steps}",
            f"ppo.total_updates={args.ppo_updates}",
        ],
        env,
    )
    ppo = json.loads((chain_dir / "ppo" / "metrics.json").read_text())
    result["ppo"] = {key: value for key, value in ppo.items() if key.startswith("time/")}

    # f. online RL compared: PPO (the chain's), GRPO and RLOO from the same SFT policy and reward
    # model, each sampling the same number of responses per update (PPO's ppo.batch_size) and
    # running as many updates; the gain is the held-out reward-model score after minus before.
    responses = OmegaConf.load(chain_dir / "ppo" / ".hydra" / "config.yaml").ppo.batch_size
    online = {"ppo": online_summary(ppo, args.ppo_updates)}
    for stage in ("grpo", "rloo"):
        run = train(
            runs / stage,
            env,
            f"model={args.model}",
            f"stage={stage}",
            f"model.init_from={chain_dir / 'sft'}",
            f"{stage}.reward_model={chain_dir / 'rm'}",
            f"{stage}.max_steps={args.ppo_updates}",
            f"{stage}.per_device_train_batch_size={responses}",
            f"{stage}.gradient_accumulation_steps=1",
            f"{stage}.save_strategy=no",
        )
        online[stage] = online_summary(run["metrics"], args.ppo_updates)
    result["online"] = {"responses_per_update": responses, "updates": args.ppo_updates, **online}

    result["total_seconds"] = time.perf_counter() - start
    write_results(args.out, f"{time.strftime('%Y-%m-%d-%H%M', started)}-{args.model}", result, markdown(result))


def online_summary(metrics: dict, updates: int) -> dict:
    """An online stage's time per update (split into phases), sampling speed and held-out gain."""
    phases = {key[len("time/") : -len("_per_update")]: value for key, value in metrics.items() if key.endswith("_per_update")}
    update_seconds = sum(phases.values())
    gain = metrics["eval_scores"] - metrics["eval_scores_before"]
    return {
        "update_seconds": update_seconds,
        "phases": phases,
        "generated_tokens_per_second": metrics["time/generated_tokens_per_second"],
        "eval_scores_before": metrics["eval_scores_before"],
        "eval_scores": metrics["eval_scores"],
        "score_gain_per_minute": gain / (update_seconds * updates / 60),
    }


def markdown(r: dict) -> str:
    lines = [
        f"Measured {r['date']} on {r['machine']}, Python {r['python']}; model `{r['model']}`, {r['steps']} steps per "
        f"SFT/DPO/RM run (SFT {2 * PAIRS_PER_STEP} sequences per step, DPO {PAIRS_PER_STEP} pairs per step), sweep jobs one "
        f"epoch over {r['sweep_pairs']} pairs, {r['ppo_updates']} PPO updates; overhead rows are medians of "
        f"{r['repeats']} runs.",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    for stage in ("sft", "dpo"):
        o = r[f"overhead_{stage}"]
        lines.append(
            f"| {stage.upper()} training-phase time, framework / plain TRL | {o['train_runtime_framework']:.2f} s / "
            f"{o['train_runtime_plain_trl']:.2f} s = {o['training_ratio']:.3f} |"
        )
        lines.append(
            f"| {stage.upper()} whole process, framework / plain TRL | {o['process_seconds_framework']:.1f} s / "
            f"{o['process_seconds_plain_trl']:.1f} s = {o['process_ratio']:.3f} |"
        )
    lines.append(
        f"| matmul peak, float32 / bfloat16, {r.get('threads', '?')} threads | {r['matmul_peak_gflops']:.0f} / "
        f"{r['matmul_peak_gflops_bfloat16']:.0f} GFLOP/s |"
    )
    for stage in ("sft", "dpo"):
        lines.append(
            f"| {stage.upper()} model-FLOP utilisation (6N + attention per trained token) against the peak of its precision "
            f"({r[f'{stage}_precision']}; plain TRL bf16={r[f'{stage}_plain_trl_bf16']}) | {r[f'{stage}_mfu']:.1%} |"
        )
    lines.append(f"| `train.py --cfg job` start-up (median of 5) | {r['startup_cfg_job_seconds']:.2f} s |")
    sft_rss, dpo_rss = r["overhead_sft"]["peak_rss_mib_framework"], r["overhead_dpo"]["peak_rss_mib_framework"]
    lines.append(f"| peak RSS, DPO+LoRA / SFT+LoRA | {dpo_rss:.0f} MiB / {sft_rss:.0f} MiB = {r['peak_rss_ratio_dpo_over_sft']:.2f} |")
    reference = r["overhead_dpo"]["reference_logps_seconds_framework"]
    lines.append(f"| DPO reference log-probs in the framework runs (computed) | {reference:.2f} s |")
    c = r["ref_cache_sweep"]
    jobs = ", ".join(f"{s:.1f}" for s in c["job_seconds"])
    refs = ", ".join(f"{s:.2f}" for s in c["reference_logps_seconds"])
    lines.append(f"| beta sweep (one `-m` process), each job's stage time | {jobs} s; later jobs {c['later_jobs_faster_by']:.0%} faster |")
    lines.append(f"| ... of which reference log-probs (computed, then loaded from the cache) | {refs} s |")
    for key, value in r["ppo"].items():
        lines.append(f"| PPO {key} | {value:.3f} |")
    o = r["online"]
    lines += [
        "",
        f"Online RL from the same SFT policy and reward model, {o['updates']} updates of {o['responses_per_update']} sampled "
        "responses each (phases per update; the score is the reward model's mean on the held-out prompts):",
        "",
        "| stage | s / update | phases (s / update) | generated tokens / s | held-out score before -> after | gain / minute of updates |",
        "|---|---|---|---|---|---|",
    ]
    for stage in ("ppo", "grpo", "rloo"):
        m = o[stage]
        phases = ", ".join(f"{phase} {seconds:.3f}" for phase, seconds in m["phases"].items())
        lines.append(
            f"| {stage.upper()} | {m['update_seconds']:.3f} | {phases} | {m['generated_tokens_per_second']:.0f} | "
            f"{m['eval_scores_before']:.2f} -> {m['eval_scores']:.2f} | {m['score_gain_per_minute']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
