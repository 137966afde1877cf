"""Training speed on one CUDA GPU, ready before a GPU is: a Qwen2.5-1.5B-shaped model with random
weights, built from its published shape (no download), trained through `train.py`.

    python bench/gpu.py            # on a CUDA machine: fits 8 minutes on one GPU
    python bench/gpu.py --smoke    # the same code on the CPU with a tiny shape (a test runs it)

Runs: bf16 LoRA SFT and DPO, 4-bit QLoRA SFT and DPO, and one PPO update (scored by a small
reward model trained first). For each: tokens per second (trained tokens over the training
phase; generated tokens for PPO), seconds per optimizer step, model-FLOP utilisation against
this GPU's measured bf16 matmul peak, and peak GPU memory (peak RSS on the CPU). Writes
bench/results/<date>-gpu[-smoke].json and .md.
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, matmul_peak_gflops, mfu, train, trained_tokens, write_results  # noqa: E402  (bench/ is the script's own folder)

sys.path.insert(0, str(ROOT))

# Qwen2.5-1.5B-Instruct's published shape (its config.json); the weights are random.
QWEN25_15B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
}
TINY_SHAPE = {
    **QWEN25_15B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
    "max_position_embeddings": 1024,
}
FULL = {"shape": QWEN25_15B, "steps": 10, "batch": 8, "hardware": "gpu", "dtype": "bfloat16", "ppo_batch": 16, "new_tokens": 64}
SMOKE = {"shape": TINY_SHAPE, "steps": 2, "batch": 2, "hardware": "cpu", "dtype": "float32", "ppo_batch": 2, "new_tokens": 8}


def build_model(out: Path, shape: dict, dtype: str) -> Path:
    """A Qwen2 causal LM of `shape` with random weights and the project's tiny tokenizer (its
    ids all fall inside the larger vocabulary): enough to time training, nothing to learn."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from rlhf.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(OmegaConf.create({"name_or_path": "builtin:tiny"})))
    config = Qwen2Config(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the same code on the CPU with a tiny shape")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for <date>-gpu.json/.md")
    args = parser.parse_args()
    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU (python bench/gpu.py --smoke runs the same code on the CPU)")
    sizes = SMOKE if args.smoke else FULL
    started, start = time.localtime(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rlhf-gpu-") as work:
        work = Path(work)
        env = {**os.environ, "RLHF_CACHE": os.environ.get("RLHF_CACHE", str(work / "cache")), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        os.environ.update(RLHF_CACHE=env["RLHF_CACHE"], HF_HUB_OFFLINE="1")
        model_dir = build_model(work / "model", sizes["shape"], sizes["dtype"])
        device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
        peak = matmul_peak_gflops(sizes["dtype"], size=8192 if device == "cuda" else 1024, device=device)
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M", started),
            "machine": machine(),
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
            "torch": torch.__version__,
            "smoke": args.smoke,
            "shape": sizes["shape"],
            "steps": sizes["steps"],
            "batch": sizes["batch"],
            f"matmul_peak_{sizes['dtype']}_gflops": peak,
            "runs": {},
        }
        base = ["model=custom", f"model.name_or_path={model_dir}", f"hardware={sizes['hardware']}", "dataset.test_size=0"]
        for stage in ("sft", "dpo"):
            for quantization in ("none", "4bit"):
                name = f"{stage}-{'bf16-lora' if quantization == 'none' else 'qlora-4bit'}"
                run = train(
                    work / name,
                    env,
                    *base,
                    f"stage={stage}",
                    f"quantization={quantization}",
                    f"{stage}.max_steps={sizes['steps']}",
                    f"{stage}.per_device_train_batch_size={sizes['batch']}",
                    f"{stage}.gradient_accumulation_steps=1",
                    f"{stage}.save_strategy=no",
                    f"{stage}.max_length=512",
                )
                sequences = sizes["steps"] * sizes["batch"] * (2 if stage == "dpo" else 1)
                result["runs"][name] = training_speed(run, work / name, model_dir, sequences, sizes["steps"], peak)
        # PPO scored by a small reward model (the tiny model's): it times the 1.5B policy's update.
        train(work / "rm", env, "stage=rm", "rm.max_steps=2", "dataset.test_size=0", f"hardware={sizes['hardware']}")
        run = train(
            work / "ppo",
            env,
            *base,
            "stage=ppo",
            f"ppo.reward_model={work / 'rm'}",
            "ppo.total_updates=1",
            f"ppo.batch_size={sizes['ppo_batch']}",
            f"ppo.mini_batch_size={sizes['ppo_batch'] // 2}",
            f"ppo.max_new_tokens={sizes['new_tokens']}",
            "ppo.save_steps=0",
            "dataset=builtin_preference",
        )
        ppo = run["metrics"]
        result["runs"]["ppo-bf16-lora"] = {
            "update_seconds": sum(value for key, value in ppo.items() if key.startswith("time/") and key.endswith("_per_update")),
            "generated_tokens_per_second": ppo["time/generated_tokens_per_second"],
            "phases": {key: value for key, value in ppo.items() if key.startswith("time/")},
            "peak_gpu_memory_mib": ppo.get("peak_gpu_memory_mib"),
            "peak_rss_mib": run["peak_rss_mib"],
        }
    result["total_seconds"] = time.perf_counter() - start
    write_results(args.out, f"{time.strftime('%Y-%m-%d', started)}-gpu{'-smoke' if args.smoke else ''}", result, markdown(result))


def training_speed(run: dict, run_dir: Path, model_dir: Path, sequences: int, steps: int, peak: float) -> dict:
    metrics = run["metrics"]
    tokens = trained_tokens(run_dir)
    return {
        "trained_tokens_per_second": tokens / metrics["train_runtime"],
        "step_seconds": metrics["train_runtime"] / steps,
        "mfu": mfu(model_dir, tokens, sequences, metrics["train_runtime"], peak),
        "peak_gpu_memory_mib": metrics.get("peak_gpu_memory_mib"),
        "peak_rss_mib": run["peak_rss_mib"],
    }


def markdown(r: dict) -> str:
    peak_key = next(key for key in r if key.startswith("matmul_peak_"))
    lines = [
        f"Measured {r['date']} on {r['gpu'] or 'the CPU (smoke)'}, {r['machine']}, torch {r['torch']}; a "
        f"{r['shape']['num_hidden_layers']}-layer, {r['shape']['hidden_size']}-wide Qwen2 (random weights), "
        f"{r['steps']} steps of {r['batch']} rows per run; {peak_key.replace('_', ' ')}: {r[peak_key]:.0f}.",
        "",
        "| run | tokens/s | s/step | MFU | peak GPU memory | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in r["runs"].items():
        memory = f"{run['peak_gpu_memory_mib']:.0f} MiB" if run.get("peak_gpu_memory_mib") else "-"
        if "mfu" in run:
            lines.append(
                f"| {name} | {run['trained_tokens_per_second']:.0f} | {run['step_seconds']:.3f} | {run['mfu']:.1%} | "
                f"{memory} | {run['peak_rss_mib']:.0f} MiB |"
            )
        else:
            lines.append(
                f"| {name} (one update) | {run['generated_tokens_per_second']:.0f} generated | {run['update_seconds']:.2f} | "
                f"- | {memory} | {run['peak_rss_mib']:.0f} MiB |"
            )
    return "\n".join(lines) + f"\n\nTotal: {r['total_seconds']:.0f} s.\n"


if __name__ == "__main__":
    main()
