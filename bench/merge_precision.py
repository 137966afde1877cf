"""How much of a finished LoRA run's update survives when a later run loads it in bfloat16 (the
GPU presets): merged into bfloat16 weights (what the project did before) or stacked unmerged
beside them (what `rlhf.lineage` does now).

    python bench/merge_precision.py RUN_DIR [--prompts 16] [--max-length 128]

RUN_DIR is a finished LoRA run (SFT on SmolLM2, say). The reference is the model the run trained:
its base with its adapter through peft, in float32. Two measures, each over the layers and
positions the adapter touches:
- weights: the update a bfloat16 merge leaves, E = merged - bf16(W), against the adapter's
  ΔW = scaling B A: the share of ΔW it keeps, <E, ΔW> / |ΔW|^2, its relative error |E - ΔW| / |ΔW|,
  and the share of ΔW's entries it drops entirely;
- logits on --prompts held-out texts (HH-RLHF chosen answers from ../shared/data, cut to
  --max-length tokens): the shift each bfloat16 form makes over the bfloat16 base, projected on
  the float32 shift (SFT minus base): share kept and relative error, for merged and stacked; and
  each form's largest logit difference from the model a bfloat16 run trains (peft's adapter over
  the bfloat16 base), which a downstream run on a GPU preset should see.
Also the memory stacking costs (its float32 LoRA buffers) and one forward's time in each form.
Writes bench/results/<date>-merge-precision.json and .md.
"""

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

from common import ROOT, cpu_flags, machine, write_results  # noqa: E402  (bench/ is the script's own folder)

sys.path.insert(0, str(ROOT))
HH = ROOT.parent / "shared" / "data" / "preference" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)

    import torch
    from omegaconf import OmegaConf
    from peft import PeftModel

    from rlhf.lineage import FULL_PRECISION, TrainedRun
    from rlhf.models import merge_adapter
    from rlhf.runs import POLICY_STAGES

    torch.manual_seed(0)
    bf16 = OmegaConf.create({"dtype": "bfloat16"})
    run = TrainedRun.of(args.run_dir, "RUN_DIR", POLICY_STAGES)
    if run.adapter is None:
        raise SystemExit(f"error: {args.run_dir}: final/ holds a whole model, not a LoRA adapter; nothing is merged or stacked")
    reference = run.load(FULL_PRECISION).eval()  # as the run trained it, in float32
    base32 = run.start.load(FULL_PRECISION).eval()
    base16 = run.start.load(bf16).eval()
    merged16 = merge_adapter(run.start.load(bf16), run.adapter).eval()  # the bfloat16 merge of before
    peft16 = PeftModel.from_pretrained(run.start.load(bf16), str(run.adapter)).eval()  # as a bfloat16 run trains it
    stacked16 = run.lineage.load(bf16).eval()  # today's bfloat16 load: the adapter stacked beside the base

    weights = weight_survival(reference, base16, merged16)
    batch = held_out_batch(run.start.tokenizer(), args.prompts, args.max_length)
    models = {"reference": reference, "base32": base32, "base16": base16, "merged16": merged16, "stacked16": stacked16, "peft16": peft16}
    logits = {name: forward(model, batch) for name, model in models.items()}
    mask = batch["attention_mask"].bool()
    shift = (logits["reference"][0] - logits["base32"][0])[mask]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "run_dir": str(args.run_dir.resolve()),
        "base": str(run.start.base.name_or_path),
        "adapter": {k: json.loads((run.adapter / "adapter_config.json").read_text()).get(k) for k in ("r", "lora_alpha", "target_modules")},
        "stage": run.cfg.stage,
        "learning_rate": OmegaConf.select(run.cfg, f"{run.cfg.stage}.learning_rate"),
        "prompts": args.prompts,
        "max_length": args.max_length,
        "tokens_compared": int(mask.sum()),
        "weights_merged_bf16": weights,
        "logit_shift_rms_float32": float(shift.pow(2).mean().sqrt()),
        "stacked_buffer_mib": sum(b.numel() * b.element_size() for n, b in stacked16.named_buffers() if "stacked_lora" in n) / 2**20,
        "model_bf16_mib": sum(p.numel() * p.element_size() for p in base16.parameters()) / 2**20,
    }
    for name in ("merged16", "stacked16"):
        moved = (logits[name][0] - logits["base16"][0])[mask]
        error = (logits[name][0] - logits["reference"][0])[mask]
        result[f"logits_{name}"] = {
            "shift_share_kept": float((moved * shift).sum() / shift.pow(2).sum()),
            "shift_relative_error": float((moved - shift).norm() / shift.norm()),
            "error_vs_float32_rms": float(error.pow(2).mean().sqrt()),
            "error_vs_peft_bfloat16_max": float((logits[name][0] - logits["peft16"][0])[mask].abs().max()),
            "forward_seconds": logits[name][1],
        }
    result["logits_base16_error_vs_float32_base_rms"] = float((logits["base16"][0] - logits["base32"][0])[mask].pow(2).mean().sqrt())
    write_results(args.out, f"{result['date']}-merge-precision", result, table(result))


def weight_survival(reference, base16, merged16) -> dict:
    """Over every layer the adapter changes: what the bfloat16 merge kept of ΔW."""
    import torch

    torch.set_grad_enabled(False)
    kept = total = error = dropped = entries = 0.0
    merged_modules = dict(merged16.named_modules())
    base_modules = dict(base16.named_modules())
    for name, module in reference.named_modules():
        if not hasattr(module, "get_delta_weight"):
            continue
        plain = name.removeprefix("base_model.model.")
        delta = module.get_delta_weight("default").float()
        applied = merged_modules[plain].weight.float() - base_modules[plain].weight.float()
        kept += float((applied * delta).sum())
        total += float(delta.pow(2).sum())
        error += float((applied - delta).pow(2).sum())
        dropped += float(((applied == 0) & (delta != 0)).sum())
        entries += float((delta != 0).sum())
    return {
        "share_kept": kept / total,
        "relative_error": (error / total) ** 0.5,
        "entries_dropped": dropped / entries,
        "update_rms": (total / entries) ** 0.5 if entries else 0.0,
        "layers": sum(1 for m in reference.modules() if hasattr(m, "get_delta_weight")),
        "dtype": str(torch.bfloat16),
    }


def held_out_batch(tokenizer, prompts: int, max_length: int) -> dict:
    if not HH.is_file():
        raise SystemExit(f"error: {HH} is missing (the benchmark reads its held-out texts from ../shared/data)")
    with gzip.open(HH, "rt") as f:
        texts = [json.loads(line)["chosen"] for _, line in zip(range(prompts), f)]
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)


def forward(model, batch) -> tuple:
    """(float32 logits, seconds of one forward pass)."""
    import torch

    with torch.no_grad():
        started = time.perf_counter()
        logits = model(**batch).logits
        return logits.float(), time.perf_counter() - started


def table(r: dict) -> str:
    w, m, s = r["weights_merged_bf16"], r["logits_merged16"], r["logits_stacked16"]
    return (
        f"## bfloat16 lineage: merged vs stacked ({r['date']}, {r['base']}, {r['stage']} adapter r={r['adapter']['r']}, "
        f"lr {r['learning_rate']})\n\n"
        f"Machine: {r['machine']}; CPU flags: {r['cpu_flags']}; bfloat16 weights. {r['tokens_compared']} held-out tokens.\n\n"
        "| | share of the update kept | relative error | RMS logit error vs float32 | max logit error vs peft in bf16 | forward s |\n"
        "|---|---|---|---|---|---|\n"
        f"| weights, bf16 merge | {w['share_kept']:.3f} | {w['relative_error']:.3f} | | | |\n"
        f"{logit_row('logits, bf16 merge (before)', m)}{logit_row('logits, stacked (now)', s)}\n"
        f"ΔW entries the bf16 merge drops entirely: {w['entries_dropped']:.3f} (update RMS {w['update_rms']:.2e}). "
        f"Float32 logit shift of the adapter: RMS {r['logit_shift_rms_float32']:.4f}; bf16 base vs float32 base: RMS "
        f"{r['logits_base16_error_vs_float32_base_rms']:.4f}. Stacking costs {r['stacked_buffer_mib']:.1f} MiB of float32 "
        f"buffers beside a {r['model_bf16_mib']:.0f} MiB bf16 model.\n"
    )


def logit_row(label: str, r: dict) -> str:
    cells = [
        f"{r['shift_share_kept']:.3f}",
        f"{r['shift_relative_error']:.3f}",
        f"{r['error_vs_float32_rms']:.4f}",
        f"{r['error_vs_peft_bfloat16_max']:.4f}",
        f"{r['forward_seconds']:.2f}",
    ]
    return f"| {label} | {' | '.join(cells)} |\n"


if __name__ == "__main__":
    main()
