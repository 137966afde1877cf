"""Experiment tracking: the W&B run (or TensorBoard directory) of a run, and the log of a stage
that drives its own loop.

The Trainer stages hand their log lines to transformers' own W&B and TensorBoard integrations
once `start_tracking` has opened the run; PPO, which runs its own loop, logs through `UpdateLog`.
W&B is imported only when `logger=wandb`, TensorBoard only when `logger=tensorboard`.
"""

import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from rlhf.runs import append_history, is_main_process, read_history


def run_name(cfg) -> str:
    return cfg.get("run_name") or "default"


def start_tracking(cfg, run_dir: Path) -> None:
    """Open the W&B run (config, name, group) or point TensorBoard at the run directory; the
    trainer's own integration then logs into it."""
    if cfg.logger.report_to == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    if cfg.logger.report_to != "wandb" or not is_main_process():
        return
    import wandb

    mode = cfg.logger.mode
    if mode == "auto":  # W&B's own WANDB_MODE when set; else never wait on the network without credentials
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb() else "offline")
    group = cfg.logger.group
    if group is None and HydraConfig.get().mode == RunMode.MULTIRUN:
        group = Path(HydraConfig.get().sweep.dir).as_posix()  # all jobs of one sweep together
    wandb.init(
        id=wandb_run_id(run_dir),  # the same id on resume: the W&B run continues
        resume="allow",
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        name=run_name(cfg),
        group=group,
        tags=list(cfg.logger.tags),
        mode=mode,
        dir=str(run_dir),
        config=OmegaConf.to_container(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]), resolve=True),
    )


def wandb_run_id(run_dir: Path) -> str:
    """The run directory's W&B id, made on first use and kept in the run directory."""
    path = run_dir / "wandb_id.txt"
    if not path.is_file():
        import uuid

        path.write_text(uuid.uuid4().hex[:16])
    return path.read_text().strip()


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def open_wandb_run():
    """The W&B run start_tracking opened, or None (wandb is imported only when one was opened)."""
    wandb = sys.modules.get("wandb")
    return wandb if wandb is not None and wandb.run is not None else None


def finish_tracking(metrics: dict) -> None:
    """Put the final metrics in the W&B run's summary and close it (no-op without W&B)."""
    wandb = open_wandb_run()
    if wandb is not None:
        wandb.summary.update(metrics)
        wandb.finish()


def replay_tracking(cfg, run_dir: Path, metrics: dict) -> None:
    """A run reused from an identical one still appears in W&B, in its sweep's group, with the
    history and final metrics it was given: a sweep compared in W&B shows every job. Lines are
    logged as the run logged them live: a Trainer stage's as transformers' W&B callback does
    (train/... and eval/... against train/global_step, its run totals in the summary), PPO's and
    eval's as their own loop does."""
    from transformers.integrations.integration_utils import rewrite_logs

    from rlhf.registry import STAGES

    if cfg.logger.report_to != "wandb" or not is_main_process():
        return
    start_tracking(cfg, run_dir)
    wandb = open_wandb_run()
    for record in read_history(run_dir / "history.jsonl"):
        values = {key: value for key, value in record.items() if key != "step"}
        if STAGES[cfg.stage].own_loop:
            wandb.log(values, step=record.get("step"))
        else:
            lines = {key: value for key, value in values.items() if key not in TRAINER_RUN_TOTALS}  # totals: in the summary below
            if lines:
                wandb.log({**rewrite_logs(lines), "train/global_step": record.get("step")})
    finish_tracking(metrics)


# What transformers' W&B callback puts in the run's summary instead of its history.
TRAINER_RUN_TOTALS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos")


class UpdateLog:
    """Where a stage running its own loop sends each update's metrics: history.jsonl, stdout, the
    open W&B run and, with logger=tensorboard, TensorBoard events in the run directory."""

    def __init__(self, cfg, run_dir: Path):
        self.history = run_dir / "history.jsonl"
        self.writes = is_main_process()  # under torchrun only rank 0 writes
        self.tensorboard = None
        if cfg.logger.report_to == "tensorboard" and self.writes:
            from torch.utils.tensorboard import SummaryWriter  # needs the [tensorboard] extra

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def __call__(self, record: dict) -> None:
        if not self.writes:
            return
        append_history(self.history, record)
        print(" ".join(f"{key}={value:.4g}" for key, value in record.items()), flush=True)
        wandb = open_wandb_run()
        if wandb is not None:
            wandb.log(record, step=record["step"])
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, global_step=record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
