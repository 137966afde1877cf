"""What the benchmarks share: running one process with its wall time and peak RSS, and a
`train.py` run that returns the metrics it wrote."""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(command: list, env: dict) -> tuple:
    """(wall seconds, peak RSS in MiB) of one process, run under /usr/bin/time from the project root."""
    handle, name = tempfile.mkstemp()
    os.close(handle)
    rss_file = Path(name)
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *command], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    rss = int(rss_file.read_text().split()[-1]) / 1024
    rss_file.unlink()
    return seconds, rss


def train(run_dir: Path, env: dict, *overrides) -> dict:
    """One `train.py` process: its wall time and peak RSS, and the metrics it wrote. It trains,
    even when an identical run finished before (a benchmark measures training, not reuse)."""
    seconds, rss = timed([sys.executable, "train.py", f"hydra.run.dir={run_dir}", "reuse=false", *overrides], env)
    return {"process_seconds": seconds, "peak_rss_mib": rss, "metrics": json.loads((run_dir / "metrics.json").read_text())}


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"


def cpu_flags() -> str:
    """The CPU's vector and matrix extensions (avx*, amx*, fma, f16c): whether bfloat16 has units here."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("flags"):
            return " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx")) or f in ("fma", "f16c")))
    return "unknown"


def history(run_dir: Path) -> list:
    from rlhf.runs import read_history  # the project's reader (the benchmarks run where rlhf is installed)

    return read_history(run_dir / "history.jsonl")


def trained_tokens(run_dir: Path) -> int | None:
    """Tokens the trainer trained on, as TRL counts them (non-padding tokens of every batch)."""
    return max((line["num_tokens"] for line in history(run_dir) if "num_tokens" in line), default=None)


def matmul_peak_gflops(dtype: str = "float32", size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """The machine's matrix-multiply rate in the dtype (and, on the CPU, the thread count)
    training uses: the best of `repeats` square products, 2 n^3 floating-point operations each."""
    import torch

    a, b = (torch.randn(size, size, dtype=getattr(torch, dtype), device=device) for _ in range(2))
    a @ b  # warm-up: thread pool, caches, kernels
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def model_flops_per_token(model_dir, sequence_length: float) -> float:
    """Training FLOPs per token: 6 x parameters (forward and backward through every weight
    matrix, a tied embedding counted once, as the output layer) plus attention's
    12 x layers x hidden size x sequence length (PaLM's model-FLOP count, Chowdhery et al. 2022,
    appendix B). Under LoRA the frozen weights need no weight gradients, so the hardware does
    less than this: the ratio to the peak is the usual, comparable model-FLOP utilisation."""
    from safetensors import safe_open

    config = json.loads((Path(model_dir) / "config.json").read_text())
    parameters = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                parameters += count
    return 6 * parameters + 12 * config["num_hidden_layers"] * config["hidden_size"] * sequence_length


def mfu(model_dir, tokens: int, sequences: int, seconds: float, peak_gflops: float) -> float:
    """Model-FLOP utilisation of a training run: model FLOPs of its tokens per second over the peak."""
    per_token = model_flops_per_token(model_dir, sequence_length=tokens / sequences)
    return per_token * tokens / seconds / (peak_gflops * 1e9)


def write_results(out_dir, name: str, result: dict, table: str) -> None:
    """<out_dir>/<name>.json (every number) and .md (the table docs/benchmarks.md shows), and the table on stdout."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(table)
    print(table)
    print(f"written: {out / name}.json, {out / name}.md")
