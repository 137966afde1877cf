"""Run one stage: claim the run directory, record the environment, dispatch to the stage,
write the metrics and the run's status.

Called by `train.py` with the composed config; the run directory is Hydra's output directory.
Every user mistake surfaces as a `UserError` and is printed as one line, without a traceback.
In a multirun a failing job records its failure in status.json and the sweep goes on
(`rlhf.runs.SweepSummary` reports all jobs at the end).
"""

import contextlib
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from rlhf import PROJECT_ROOT, chain, compat, package_versions, preemption
from rlhf.errors import UserError, error_lines
from rlhf.registry import STAGES, runs_steps
from rlhf.reuse import reuse_or_train
from rlhf.runs import finished_with, holding_run_dir, is_main_process, last_complete_checkpoint, prepare_run_dir, write_json, write_status
from rlhf.stages import get_stage
from rlhf.tracking import finish_tracking, replay_tracking, start_tracking
from rlhf.validate import check_gpu_present, validate

RECORDED_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "hydra-core", "omegaconf")


def main(cfg, run_dir: Path | None = None):
    """Train the configured stage in `run_dir` (default: Hydra's output directory); return the
    sweep objective (NaN for a failed job of a sweep)."""
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    run_dir = Path(run_dir or hydra.runtime.output_dir)
    adopt_slurm_ranks()
    in_sweep = hydra is not None and hydra.mode == RunMode.MULTIRUN
    try:
        with preemption.handled(interrupt=checkpoints(cfg.stage)):
            try:
                return run_or_skip(cfg, run_dir, hydra, in_sweep)
            except preemption.Preempted as stop:  # before UserError, which it is: a sweep stops too (allocation ending, or Ctrl-C)
                print(f"{run_dir}: {stop}", file=sys.stderr, flush=True)
                preemption.hand_over()  # a launcher's own handler (submitit: requeue this job) now that the checkpoint is safe
                raise SystemExit(stop.exit_code) from None
    except UserError as err:
        print(error_lines(err), file=sys.stderr)
        if not in_sweep:
            raise SystemExit(2) from None
    except Exception:
        if not in_sweep:
            raise
        traceback.print_exc()  # a bug, not a user error: the job's log keeps the traceback
    return float("nan") if cfg.get("objective") else None


def checkpoints(stage) -> bool:
    """Whether stage `stage` stops at a step boundary with a checkpoint when asked (it trains, or
    its steps do): there Ctrl-C waits for that; elsewhere it stops at once."""
    return stage in STAGES and (STAGES[stage].makes is not None or STAGES[stage].steps)


def run_or_skip(cfg, run_dir: Path, hydra, in_sweep: bool):
    """The run's metrics' objective: a finished run of this config in a sweep or chain directory is
    left as it is; otherwise claim the directory and run the stage."""
    with holding_run_dir(run_dir):  # one process per run directory, from before anything there is read or written
        if (in_sweep or runs_steps(cfg.stage)) and cfg.get("resume", "auto") == "auto" and finished_with(run_dir, cfg):
            # Re-running a sweep or a chain into its directory: what finished with this config stays as it is.
            print(f"{run_dir}: already finished with this config; skipped", flush=True)
            return objective(cfg, json.loads((run_dir / "metrics.json").read_text()))
        prepare_run_dir(cfg, run_dir, hydra.overrides.task if hydra else [], hydra, write=is_main_process())
        metrics = run_stage(cfg, run_dir, hydra.overrides.task if hydra else [])
    if is_main_process():
        print(f"final metrics ({run_dir}):\n" + json.dumps(metrics, indent=2, ensure_ascii=False))
    return objective(cfg, metrics)


def adopt_slurm_ranks() -> None:
    """A SLURM job with several tasks (hydra/launcher=slurm_multi_gpu) starts one process per
    task but sets only SLURM's variables; torch.distributed reads RANK, WORLD_SIZE, LOCAL_RANK
    and MASTER_ADDR/PORT, which submitit derives from them. torchrun sets them itself."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export()


def run_stage(cfg, run_dir: Path, overrides=()) -> dict:
    """env.json, the stage's training, metrics.json, and status.json throughout: one complete
    run directory (or one that says why it is not). Under torchrun only rank 0 writes them. A run
    identical to one that finished elsewhere is filled from it instead (`rlhf.reuse`)."""
    main_process = is_main_process()
    try:
        validate(cfg, list(overrides))  # before the stage's heavy imports and before any model or dataset loads
        if runs_steps(cfg.stage):  # each step is a run of its own, reused or trained
            return train_stage(cfg, run_dir, functools.partial(chain.run, cfg, run_dir, run_stage=run_stage))
        check_gpu_present(cfg)  # a run's own machine: a GPU config stays valid on any machine
        from rlhf.context import RunContext  # here: --help and --cfg never import torch

        context = RunContext.open(cfg, run_dir)  # its device, precision and the earlier runs it reads, decided once
        with reuse_or_train(cfg, run_dir, context.runs) as reused:
            if reused is None:
                return train_stage(cfg, run_dir, functools.partial(get_stage(cfg.stage), context), context.precision)
        replay_tracking(cfg, run_dir, reused)  # after the lock: identical jobs need not wait on W&B
        return reused
    except preemption.Preempted as stop:
        if main_process:
            write_status(run_dir, stop.status, str(stop), step=stop.step)
        raise
    except BaseException as err:
        failure = user_facing(err, run_dir)
        if main_process:
            with contextlib.suppress(OSError):  # a full disk may not take status.json either
                write_status(run_dir, "failed", str(failure) if isinstance(failure, UserError) else f"{type(failure).__name__}: {failure}")
        if isinstance(failure, UserError):
            raise failure from None
        raise


def user_facing(err: BaseException, run_dir: Path) -> BaseException:
    """The error as the user should read it: a full disk becomes one line saying what to do (the
    checkpoint in progress never got its mark, the earlier ones stand); anything else as it is."""
    if not compat.out_of_space(err):
        return err
    last = last_complete_checkpoint(run_dir)
    resumes = f"it resumes from {last.name}" if last else "it starts over (no complete checkpoint yet)"
    return UserError(f"no space left on the device while writing {run_dir}: free some, then run the same command again; {resumes}")


def train_stage(cfg, run_dir: Path, train, precision: str | None = None) -> dict:
    """`train()` (the stage's run, or a chain's) between env.json and metrics.json, tracked and
    seeded; `precision`: the run's, which a chain has not (each step says its own)."""
    main_process = is_main_process()
    if main_process and precision is not None:
        print(f"precision: {precision}", flush=True)
    if main_process:
        write_json(run_dir / "env.json", environment(cfg, precision))
        write_status(run_dir, "running")
    tracked = not runs_steps(cfg.stage)  # a chain's steps are tracked as runs of their own
    if tracked:  # the run's W&B run (or TensorBoard directory): the Trainer's integration and PPO's log write into it
        start_tracking(cfg, run_dir)
    start = time.perf_counter()
    seed_everything(cfg.seed)  # before any model loads: a new head (the RM's score, PPO's value head) starts the same every run
    metrics = train()
    metrics["stage_runtime"] = time.perf_counter() - start  # seconds from model loading to the saved result
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        metrics["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20  # this process, this device
    if tracked:
        finish_tracking(metrics)  # the final metrics in the W&B summary, and the run closed
    if main_process:
        write_json(run_dir / "metrics.json", metrics)
        write_status(run_dir, "done")
    return metrics


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's random state from the run's seed. Weights a checkpoint lacks
    are drawn when the model loads, before any trainer seeds itself: unseeded, a reward model's
    score head started differently in every run, and so did what it learned."""
    from transformers import set_seed

    set_seed(seed)


def objective(cfg, metrics: dict):
    """The number a sweeper (Optuna) optimises: metrics[cfg.objective], when one is named."""
    name = cfg.get("objective")
    if name is None:
        return None
    if name not in metrics:
        raise UserError(f"objective={name}: the run produced no such metric; it has {sorted(metrics)}")
    return metrics[name]


def environment(cfg, precision: str | None) -> dict:
    """What it takes to reproduce the run besides its config: versions, commit, seed, command."""
    return {
        "command": " ".join(shlex.quote(redact(arg)) for arg in [sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "seed": cfg.seed,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),  # the device a gpu_pool job was given
        "precision": precision,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(RECORDED_PACKAGES),
        "git": git_state(),
    }


SECRET_WORDS = {"token", "secret", "password", "apikey"}  # whole words of a key's last part, split at "_"


def redact(argument: str) -> str:
    """`hub_token=abc` -> `hub_token=***`: credentials never reach env.json (but
    `ppo.max_new_tokens=32` stays: a hyperparameter, not a secret)."""
    key, sep, _ = argument.partition("=")
    words = key.rsplit(".", 1)[-1].lower().replace("api_key", "apikey").split("_")
    return f"{key}=***" if sep and SECRET_WORDS & set(words) else argument


def git_state() -> dict:
    """The project's commit and whether the working tree differed from it (None outside git)."""

    def git(*args):
        done = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "dirty": bool(git("status", "--porcelain")) if commit else None}
