"""Run one stage: find it, seed, record the environment, dispatch, write the metrics.

Called by `train.py` with the composed config; the run directory is Hydra's output directory
(which already holds `.hydra/`). Every user mistake surfaces as a `UserError` and is printed as
one line, without a traceback.
"""

import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from rlhf import PROJECT_ROOT
from rlhf.errors import UserError
from rlhf.stages import get_stage

RECORDED_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "hydra-core", "omegaconf")


def main(cfg, run_dir: Path | None = None):
    """Train the configured stage in `run_dir` (default: Hydra's output directory); return the
    sweep objective."""
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    try:
        metrics = run_stage(cfg, run_dir)
        print(f"final metrics ({run_dir}):\n" + json.dumps(metrics, indent=2, ensure_ascii=False))
        return objective(cfg, metrics)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run_stage(cfg, run_dir: Path) -> dict:
    """env.json, the stage's training, metrics.json: one complete run directory."""
    stage = get_stage(cfg.stage)
    write_json(run_dir / "env.json", environment(cfg))
    metrics = stage(cfg, run_dir)
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def objective(cfg, metrics: dict):
    """The number a sweeper (Optuna) optimises: metrics[cfg.objective], when one is named."""
    name = cfg.get("objective")
    if name is None:
        return None
    if name not in metrics:
        raise UserError(f"objective={name}: the run produced no such metric; it has {sorted(metrics)}")
    return metrics[name]


def environment(cfg) -> dict:
    """What it takes to reproduce the run besides its config: versions, commit, seed, command."""
    versions = {}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "command": " ".join(shlex.quote(arg) for arg in [sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "seed": cfg.seed,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "git": git_state(),
    }


def git_state() -> dict:
    """The project's commit and whether the working tree differed from it (None outside git)."""

    def git(*args):
        done = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "dirty": bool(git("status", "--porcelain")) if commit else None}


def write_json(path: Path, data: dict) -> None:
    """Write whole or not at all: a crash mid-write never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
