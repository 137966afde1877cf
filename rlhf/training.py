"""What every stage's trainer shares: the model, tokenizer and data it starts from, its TRL
settings object, the history log, the tracker, and the train -> evaluate -> save sequence
that ends a run."""

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import TrainerCallback

from rlhf.data import Splits, load_splits
from rlhf.errors import NonFiniteLoss
from rlhf.lineage import Lineage, TrainedRun, write_final_lineage
from rlhf.runs import (
    CHECKPOINT_MARK,
    append_history,
    is_main_process,
    last_complete_checkpoint,
    resume_point,
    write_json,
)

log = logging.getLogger(__name__)


@dataclass
class StageInputs:
    tokenizer: object
    model: object
    data: Splits  # train and held-out records of the stage's data kind
    peft_config: object  # peft.LoraConfig, or None for full fine-tuning
    lineage: Lineage  # what the model stands on: its base and the earlier runs merged into it
    head: str  # "causal_lm" (a policy) or "reward" (a sequence classifier)


def load_inputs(cfg, data_kind: str, head: str = "causal_lm") -> StageInputs:
    """Tokenizer, data (checked before the model loads, so bad rows fail fast), then the model
    (with the runs it starts from merged in) and the LoRA settings for this stage's head."""
    lineage = Lineage.of(cfg.model)
    tokenizer = lineage.tokenizer()
    data = load_splits(cfg.dataset, kind=data_kind)
    model = lineage.load(cfg.hardware, cfg.quantization, head=head)
    peft_config = None
    if cfg.peft is not None:  # a reward model's LoRA also trains and saves its score head
        peft_config = instantiate(cfg.peft, task_type="SEQ_CLS" if head == "reward" else "CAUSAL_LM")
    return StageInputs(tokenizer, model, data, peft_config, lineage, head)


def load_reward_model(rm_run, cfg, key: str = "ppo.reward_model"):
    """(reward model, its tokenizer) from a finished `stage=rm` run named by the setting `key`:
    its base model with every adapter of its lineage and its own (score head included) merged
    in, frozen."""
    run = TrainedRun.of(rm_run, key, stages=("rm",))
    model = run.load(cfg.hardware, head="reward", merge=True)
    model.requires_grad_(False)
    return model.eval(), run.start.tokenizer()


def save_final(run_dir: Path, model, inputs: StageInputs, cfg) -> Path:
    """final/: the trained adapter or model, the tokenizer, and what they stand on
    (`rlhf.lineage`); written by the main process only."""
    final = run_dir / "final"
    if is_main_process():
        model.save_pretrained(str(final))
        inputs.tokenizer.save_pretrained(str(final))
        write_final_lineage(final, inputs.lineage, cfg, inputs.head)
    return final


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


def device_for(cfg):
    """Where a stage that drives its own loop (PPO, eval) computes: a GPU when the hardware
    preset uses one and there is one."""
    return torch.device("cuda" if torch.cuda.is_available() and not cfg.hardware.training_args.use_cpu else "cpu")


class HistoryWriter(TrainerCallback):
    """Appends each log event of a transformers Trainer (train and eval) to history.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_history(self.path, {"step": state.global_step, "epoch": state.epoch, **logs})


def start_tracking(cfg, run_dir: Path) -> None:
    """Open the W&B run (config, name, group) or point TensorBoard at the run directory; the
    trainer's own integration then logs into it."""
    if cfg.logger.report_to == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    if cfg.logger.report_to != "wandb" or not is_main_process():
        return
    import wandb

    mode = cfg.logger.mode
    if mode == "auto":  # never wait on the network without credentials
        mode = "online" if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb() else "offline"
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


def dropped_by_trainer(trainer, data: Splits) -> int:
    """Rows the TRL trainer filtered out while tokenizing (DPO drops pairs whose prompt alone
    fills max_length under keep_start truncation): counted and reported, never silent."""
    dropped = len(data.train) - len(trainer.train_dataset)
    if data.eval is not None and trainer.eval_dataset is not None:
        dropped += len(data.eval) - len(trainer.eval_dataset)
    if dropped:
        log.warning(
            "dataset: the trainer dropped %d rows longer than max_length=%s; raise max_length or use truncation_mode=keep_end to keep them",
            dropped,
            trainer.args.max_length,
        )
    return dropped


class RunGuard(TrainerCallback):
    """Keeps a run safe to resume: weights gone NaN or infinite stop training before a
    bad checkpoint is written; every checkpoint, once wholly written, gets a mark holding the
    running loss total, so that only complete checkpoints are resumed from and a resumed run
    reports the same train_loss as an uninterrupted one."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        # Before every log and checkpoint. The weights, not the logged loss: transformers replaces
        # a NaN step loss before logging it (logging_nan_inf_filter), and NaN weights can still
        # give a finite loss; a NaN loss always reaches the weights through the optimizer step.
        if (control.should_save or control.should_log) and not all(
            torch.isfinite(p).all() for p in self.trainer.model.parameters() if p.requires_grad
        ):
            raise NonFiniteLoss(f"training diverged at step {state.global_step}: the weights are no longer finite; {self.kept(args)}")

    @staticmethod
    def kept(args) -> str:
        checkpoint = last_complete_checkpoint(Path(args.output_dir).parent)
        return f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written before it"

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # transformers keeps the loss sum of logged steps in _total_loss_scalar and of the
        # steps since the last log in _tr_loss; a resumed Trainer starts both at zero.
        # TRL counts the tokens trained on in _total_train_tokens, also restarted at zero.
        total = self.trainer._total_loss_scalar + self.trainer._tr_loss.item()
        tokens = getattr(self.trainer, "_total_train_tokens", 0)
        if checkpoint.is_dir() and state.is_world_process_zero:
            write_json(checkpoint / CHECKPOINT_MARK, {"step": state.global_step, "loss_total": total, "num_tokens": tokens})


def fit(trainer, run_dir: Path, inputs: StageInputs, cfg) -> dict:
    """Train (resuming from the last complete checkpoint when there is one and resume=auto),
    evaluate on the held-out split, save the adapter/model and tokenizer to final/, and return
    the final metrics as one flat dict."""
    dropped = dropped_by_trainer(trainer, inputs.data)
    trainer.add_callback(RunGuard(trainer))
    checkpoint, mark = resume_point(cfg, run_dir)
    if checkpoint is not None:
        if hasattr(trainer, "_total_train_tokens"):
            trainer._total_train_tokens = mark["num_tokens"]
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    metrics = {
        **result.metrics,
        "data/skipped_rows": inputs.data.skipped_rows,
        "data/dropped_rows": dropped,
        **getattr(trainer, "timings", {}),
    }  # phases outside train(), e.g. DPO's reference log-probs
    if checkpoint is not None:  # the mean loss over all steps, not only those since the resume
        metrics["train_loss"] = (mark["loss_total"] + trainer._total_loss_scalar) / trainer.state.global_step
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.save_model(str(run_dir / "final"))  # on the main process only (the Trainer checks)
    if is_main_process():
        trainer.processing_class.save_pretrained(str(run_dir / "final"))
        write_final_lineage(run_dir / "final", inputs.lineage, cfg, inputs.head)
    finish_tracking(metrics)
    return metrics


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
