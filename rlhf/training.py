"""What every stage's trainer shares: the model, tokenizer and data it starts from, its TRL
settings object, the history log, the tracker, and the train -> evaluate -> save sequence
that ends a run."""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import TrainerCallback

from rlhf.data import Splits, load_splits
from rlhf.models import load_causal_lm, load_tokenizer, resolve_model_path

log = logging.getLogger(__name__)


@dataclass
class StageInputs:
    tokenizer: object
    model: object
    data: Splits  # train and held-out records of the stage's data kind
    peft_config: object  # peft.LoraConfig, or None for full fine-tuning


def load_inputs(cfg, data_kind: str) -> StageInputs:
    """Tokenizer, data (checked before the model loads, so bad rows fail fast), then model."""
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model)
    data = load_splits(cfg.dataset, kind=data_kind)
    model = load_causal_lm(model_path, cfg.model, cfg.quantization, cfg.hardware)
    peft_config = instantiate(cfg.peft) if cfg.peft is not None else None
    return StageInputs(tokenizer, model, data, peft_config)


def trainer_kwargs(cfg, stage_cfg, inputs: StageInputs, run_dir: Path) -> dict:
    """The arguments every TRL trainer takes the same way: model, settings, data, tokenizer,
    LoRA config and the history callback."""
    return {
        "model": inputs.model,
        "args": training_args(cfg, stage_cfg, run_dir, has_eval=inputs.data.eval is not None),
        "train_dataset": inputs.data.train,
        "eval_dataset": inputs.data.eval,
        "processing_class": inputs.tokenizer,
        "peft_config": inputs.peft_config,
        "callbacks": [HistoryWriter(run_dir / "history.jsonl")],
    }


def training_args(cfg, stage_cfg, run_dir: Path, has_eval: bool):
    """The stage's TRL config object (`_target_` in its YAML), with the hardware preset's
    training arguments underneath and the run's own paths, seed and tracker on top."""
    settings = {
        **OmegaConf.to_container(cfg.hardware.training_args, resolve=True),
        **OmegaConf.to_container(stage_cfg, resolve=True),
        "output_dir": str(run_dir / "checkpoints"),
        "seed": cfg.seed,
        "report_to": cfg.logger.report_to,
        "run_name": run_name(cfg),
    }
    if not has_eval:  # no held-out split: evaluating would fail mid-run
        settings["eval_strategy"] = "no"
    return instantiate(settings, _convert_="all")


def run_name(cfg) -> str:
    return cfg.get("run_name") or "default"


class HistoryWriter(TrainerCallback):
    """Appends each log event of the trainer (train and eval) to <run_dir>/history.jsonl as it
    happens, so a crashed run keeps the history up to the crash."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, **logs}
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


def start_tracking(cfg, run_dir: Path) -> None:
    """Open the W&B run (config, name, group) or point TensorBoard at the run directory; the
    trainer's own integration then logs into it."""
    if cfg.logger.report_to == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    if cfg.logger.report_to != "wandb":
        return
    import wandb

    mode = cfg.logger.mode
    if mode == "auto":  # never wait on the network without credentials
        mode = "online" if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb() else "offline"
    group = cfg.logger.group
    if group is None and HydraConfig.get().mode == RunMode.MULTIRUN:
        group = Path(HydraConfig.get().sweep.dir).as_posix()  # all jobs of one sweep together
    wandb.init(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        name=run_name(cfg),
        group=group,
        tags=list(cfg.logger.tags),
        mode=mode,
        dir=str(run_dir),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def dropped_by_trainer(trainer, data: Splits) -> int:
    """Rows the TRL trainer filtered out while tokenizing (DPO drops pairs whose prompt alone
    fills max_length under keep_start truncation): counted and reported, never silent."""
    dropped = len(data.train) - len(trainer.train_dataset)
    if data.eval is not None and trainer.eval_dataset is not None:
        dropped += len(data.eval) - len(trainer.eval_dataset)
    if dropped:
        log.warning(
            "dataset: the trainer dropped %d rows longer than max_length=%s; raise max_length or use "
            "truncation_mode=keep_end to keep them",
            dropped,
            trainer.args.max_length,
        )
    return dropped


def fit(trainer, run_dir: Path, inputs: StageInputs) -> dict:
    """Train, evaluate on the held-out split, save the adapter/model and tokenizer to final/,
    and return the final metrics as one flat dict."""
    dropped = dropped_by_trainer(trainer, inputs.data)
    result = trainer.train()
    metrics = {**result.metrics, "data/skipped_rows": inputs.data.skipped_rows, "data/dropped_rows": dropped}
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.save_model(str(run_dir / "final"))
    trainer.processing_class.save_pretrained(str(run_dir / "final"))
    if trainer.args.report_to and "wandb" in trainer.args.report_to:
        import wandb

        wandb.summary.update(metrics)
        wandb.finish()
    return metrics
