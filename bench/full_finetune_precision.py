"""How much of a whole-model update survives in a run's saved final/ on the GPU presets' dtype,
for this checkout and for an earlier one (`--before-root`): a full fine-tune at a small learning
rate, and an upstream LoRA adapter folded into a `peft=none` run's weights.

    python bench/full_finetune_precision.py --before-root ../before [--steps 8]

Every number comes from `train.py` commands as a user types them, on SmolLM2-135M-Instruct with
BELLE rows from ../shared/data (4 rows of at most 256 tokens per step), run on the CPU with
`hardware=gpu hardware.training_args.use_cpu=true` (the GPU preset's dtype and autocast):
- full fine-tune: `stage=sft peft=none sft.learning_rate=1e-6` for --steps steps, compared with the
  same run in float32 throughout (`hardware=cpu hardware.training_args.bf16=false`), the exact
  update dW. Over every 2-d weight: the share of dW kept, <E, dW> / |dW|^2 where E is the saved
  weights minus the base in the saved dtype; the relative error |E - dW| / |dW|; the share of
  entries that changed at all.
- folded adapter: a LoRA SFT run (the cpu preset, --steps steps), then `stage=sft peft=none
  model.init_from=<it> sft.max_steps=1 sft.learning_rate=1e-12` on the GPU preset: its final/
  holds the base with the adapter folded in (the one step moves no float32 weight: 1e-12 is
  under half a float32 step of every weight it could reach). Against the adapter's
  dW = scaling B A: the same three measures.
Writes bench/results/<date>-full-finetune-precision.json and .md.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, cpu_flags, machine, write_results  # noqa: E402  (bench/ is the script's own folder)

sys.path.insert(0, str(ROOT))
BELLE = ROOT.parent / "shared" / "data" / "sft_zh" / "belle" / "dev1K.json"
DATA = [
    "model=smollm2-135m",
    "dataset=belle",
    f"dataset.path={BELLE}",
    "dataset.max_samples=64",
    "dataset.test_size=0",
    "sft.per_device_train_batch_size=4",
    "sft.gradient_accumulation_steps=1",
    "sft.max_length=256",
    "sft.save_strategy=no",
    "sft.eval_strategy=no",
    "reuse=false",
]
GPU_PRESET_ON_CPU = ["hardware=gpu", "hardware.training_args.use_cpu=true", "hardware.training_args.dataloader_num_workers=0"]


def run(root: Path, run_dir: Path, *overrides) -> dict:
    """One train.py process from checkout `root`: its wall time and its env.json."""
    started = time.perf_counter()
    command = [sys.executable, str(root / "train.py"), f"hydra.run.dir={run_dir}", *DATA, *overrides]
    done = subprocess.run(command, cwd=root, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(command)}\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}")
    env = json.loads((run_dir / "env.json").read_text()) if (run_dir / "env.json").is_file() else {}
    return {"seconds": round(time.perf_counter() - started, 1), "precision": env.get("precision"), "command": " ".join(overrides)}


def weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return {name.removeprefix("model."): tensor for name, tensor in tensors.items() if tensor.dim() == 2}


def kept(saved: dict, base: dict, update: dict) -> dict:
    """The share of `update` (name -> exact float64 dW) that `saved` holds over `base` (the base
    rounded to each saved tensor's dtype), its relative error, and the share of entries changed."""
    import torch

    dot = norm2 = error2 = changed = entries = 0.0
    for name, delta in update.items():
        if name not in saved:  # tied lm_head: saved once, as the embedding
            continue
        held = saved[name].double() - base[name].to(saved[name].dtype).double()
        dot += float((held * delta).sum())
        norm2 += float((delta * delta).sum())
        error2 += float(((held - delta) ** 2).sum())
        changed += int((held != 0).sum())
        entries += held.numel()
    return {
        "share_kept": round(dot / norm2, 4),
        "relative_error": round((error2 / norm2) ** 0.5, 4),
        "entries_changed": round(changed / entries, 4),
        "saved_dtype": str(next(iter(saved.values())).dtype).removeprefix("torch."),
        "update_rms": float(torch.tensor(norm2 / entries).sqrt()),
    }


def adapter_update(adapter_dir: Path) -> dict:
    """name -> scaling B A in float64, for every LoRA pair of a saved adapter."""
    from safetensors.torch import load_file

    settings = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = settings["lora_alpha"] / settings["r"]
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    update = {}
    for key, lora_a in tensors.items():
        if key.endswith(".lora_A.weight"):
            lora_b = tensors[key.replace(".lora_A.weight", ".lora_B.weight")]
            name = key.removeprefix("base_model.model.").removeprefix("model.").replace(".lora_A.weight", ".weight")
            update[name] = scaling * lora_b.double() @ lora_a.double()
    return update


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-root", type=Path, required=True, help="a checkout of the earlier code: git worktree add DIR COMMIT")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench-full-finetune-precision")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if not BELLE.is_file():
        raise SystemExit(f"error: {BELLE} is missing (../shared/data)")

    from rlhf.model_sources import ensure_smollm2

    base = weights(Path(ensure_smollm2()))
    roots = {"before": args.before_root.resolve(), "after": ROOT}
    steps = [f"sft.max_steps={args.steps}"]
    full = ["peft=none", "sft.learning_rate=1e-6", *steps]
    commands, result = {}, {"full_finetune": {}, "folded_adapter": {}}

    reference_dir = args.work / "full-float32"
    commands["full_float32"] = run(ROOT, reference_dir, *full, "hardware=cpu", "hardware.training_args.bf16=false")
    reference = weights(reference_dir / "final")
    exact = {name: reference[name].double() - base[name].double() for name in reference if name in base}
    for side, root in roots.items():
        run_dir = args.work / f"full-gpu-preset-{side}"
        commands[f"full_gpu_preset_{side}"] = run(root, run_dir, *full, *GPU_PRESET_ON_CPU)
        result["full_finetune"][side] = kept(weights(run_dir / "final"), base, exact)

    lora_dir = args.work / "sft-lora"
    commands["sft_lora"] = run(ROOT, lora_dir, *steps)
    update = adapter_update(lora_dir / "final")
    for side, root in roots.items():
        run_dir = args.work / f"folded-gpu-preset-{side}"
        fold = ["peft=none", f"model.init_from={lora_dir}", "sft.max_steps=1", "sft.learning_rate=1e-12"]
        commands[f"folded_gpu_preset_{side}"] = run(root, run_dir, *fold, *GPU_PRESET_ON_CPU)
        result["folded_adapter"][side] = kept(weights(run_dir / "final"), base, update)

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=roots["before"], capture_output=True, text=True)
    before_commit = git.stdout.strip()
    result.update(
        {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "cpu_flags": cpu_flags(),
            "before_commit": before_commit,
            "steps": args.steps,
            "runs": commands,
        }
    )
    write_results(args.out, f"{result['date']}-full-finetune-precision", result, table(result))


def table(r: dict) -> str:
    rows = [
        "| what | code | saved dtype | share of dW kept | relative error | entries changed |",
        "|---|---|---|---|---|---|",
    ]
    for part, label in (("full_finetune", f"full fine-tune, lr 1e-6, {r['steps']} steps"), ("folded_adapter", "LoRA SFT adapter folded")):
        for side in ("before", "after"):
            m = r[part][side]
            code = f"before ({r['before_commit']})" if side == "before" else "after"
            rows.append(f"| {label} | {code} | {m['saved_dtype']} | {m['share_kept']} | {m['relative_error']} | {m['entries_changed']} |")
    runs = "\n".join(f"- {name}: {run['seconds']} s, precision `{run['precision']}`" for name, run in r["runs"].items())
    return (
        f"# Whole-model updates on the GPU preset's dtype ({r['date']})\n\n"
        f"Machine: {r['machine']}; CPU flags: {r['cpu_flags']}. SmolLM2-135M-Instruct, BELLE, 4 rows x 256 tokens per step; "
        "the GPU preset run on the CPU (`hardware=gpu hardware.training_args.use_cpu=true`).\n\n" + "\n".join(rows) + f"\n\nRuns:\n{runs}\n"
    )


if __name__ == "__main__":
    main()
