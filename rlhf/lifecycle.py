"""A stage's life, shared by every stage: the model, tokenizer and data it starts from
(`load_inputs`), its TRL settings object and history log (`trainer_kwargs`), and the
train -> evaluate -> save sequence that ends it (`fit`, `save_final`), so that a stage module
holds only its recipe. Around it, `rlhf.command` opens and closes the tracker and writes the
status and metrics; every model loaded for a bfloat16-autocast run sums its adapters in float32
from the start (`rlhf.models.load_model`)."""

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import TrainerCallback

from rlhf import preemption
from rlhf.compat import (
    logged_loss_total,
    restore_trained_tokens,
    running_loss_total,
    score_labelled_positions_on_cpu,
    trained_tokens,
)
from rlhf.data import Splits, load_splits
from rlhf.errors import NonFiniteLoss, UserError
from rlhf.generation import fitted_prompts
from rlhf.lineage import Lineage, write_final_lineage
from rlhf.models import fold_stacked_updates
from rlhf.registry import REWARD_MODEL, STAGES
from rlhf.reward_model import reward_model_identity
from rlhf.runs import (
    CHECKPOINT_MARK,
    append_history,
    last_complete_checkpoint,
    read_json,
    resume_point,
    write_json,
)
from rlhf.tracking import run_name

log = logging.getLogger(__name__)


@dataclass
class StageInputs:
    tokenizer: object
    model: object
    data: Splits  # train and held-out records of the stage's data kind
    peft_config: object  # peft.LoraConfig, or None for full fine-tuning
    lineage: Lineage  # what the model stands on: its base and the earlier runs merged into it
    head: str  # "causal_lm" (a policy) or "reward" (a sequence classifier)
    identity: dict | None = None  # what the run's checkpoints hold only for (`inputs_identity`), once checked


def load_inputs(context, data_kind: str, head: str = "causal_lm") -> StageInputs:
    """Tokenizer, data (checked before the model loads, so bad rows fail fast), then the model
    (with the runs it starts from merged in) and the LoRA settings for this stage's head."""
    cfg = context.cfg
    lineage = Lineage.of(cfg.model)
    tokenizer = lineage.tokenizer()
    data = load_splits(cfg.dataset, kind=data_kind)
    model = lineage.load(cfg.hardware, cfg.quantization, head=head)
    peft_config = None
    if cfg.peft is not None:  # a reward model's LoRA also trains and saves its score head
        peft_config = instantiate(cfg.peft, task_type="SEQ_CLS" if head == "reward" else "CAUSAL_LM")
    return StageInputs(tokenizer, model, data, peft_config, lineage, head)


def load_prompt_inputs(context, max_prompt_length: int) -> tuple:
    """`load_inputs` for a stage that samples (PPO, GRPO, RLOO), and how many prompts were cut:
    every prompt, training and held-out alike, fitted by whole turns to `<stage>.max_prompt_length`
    (rlhf.generation.fit_prompts), so that the policy samples from the conversation the reward
    model scores."""
    inputs = load_inputs(context, data_kind="prompt")
    key = f"{context.cfg.stage}.max_prompt_length"
    inputs.data, cut = fitted_prompts(inputs.data, inputs.tokenizer, max_prompt_length, key)
    return inputs, cut


def resume_or_start(context, inputs: StageInputs, *prompts) -> tuple:
    """(the run's `inputs_identity` over `prompts` as fitted and sampled, the checkpoint to go on
    from or None, its mark) for a stage that drives its own loop: under resume=auto the last
    complete checkpoint, refused in one line when it was written for other inputs. Call it before
    the reward model loads: a refused resume then costs no loading."""
    identity = inputs_identity(context, inputs, rows=fingerprint(*prompts))
    checkpoint, mark = resume_point(context.cfg, context.run_dir)
    if checkpoint is not None:
        refuse_other_inputs(checkpoint, mark["keep"], identity, context.cfg)
    return identity, checkpoint, mark


def inputs_identity(context, inputs: StageInputs, rows: str | None = None) -> dict:
    """What a checkpoint holds only for, by content: the rows the run trains on and scores (`rows`,
    or a digest of the loaded splits), the starting policy's weights with the precision and
    quantization it computes in, and every reward model the stage reads (weights, precision,
    max_length). Every checkpoint mark records it; a resume onto other inputs is refused
    (`refuse_other_inputs`): the config alone does not fix them (a data file edited, an upstream
    run retrained into the same directory)."""
    identity = {
        "data": rows or fingerprint(inputs.data.train, inputs.data.eval),
        "start": inputs.lineage.identity(context.precision, context.cfg.quantization),
    }
    for key, (made, _) in STAGES[context.cfg.stage].reads.items():
        if made == REWARD_MODEL and key in context.runs:
            identity[key] = reward_model_identity(context.runs[key], context.precision)
    return identity


def fingerprint(*splits) -> str:
    """A digest of the rows of `splits` (lists or datasets of dicts; None: no such split), in order."""
    digest = hashlib.sha256()
    for split in splits:
        for row in split if split is not None else ():
            digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8") + b"\n")
        digest.update(b"\0")  # where a split ends
    return digest.hexdigest()


def refuse_other_inputs(checkpoint: Path, recorded: dict, identity: dict, cfg) -> None:
    """Stop, in one line naming what differs, before resuming `checkpoint` (whose mark `recorded`
    the `inputs_identity` it was written with) onto other inputs: going on would train one run on
    two sets of inputs."""
    differ = [describe_input(name, cfg) for name, value in identity.items() if name in recorded and recorded[name] != value]
    unrecorded = [describe_input(name, cfg) for name in identity if name not in recorded]
    if differ or unrecorded:
        why = ([f"its {' and '.join(differ)} differ"] if differ else []) + (
            [f"it recorded no {' or '.join(unrecorded)} (an older checkpoint)"] if unrecorded else []
        )
        raise UserError(
            f"{checkpoint} was written for other inputs than this run's: {'; '.join(why)}. Going on would mix two runs; "
            "pass resume=overwrite to start this run over"
        )


def describe_input(name: str, cfg) -> str:
    """An `inputs_identity` entry as the refusal names it: with the setting that points at it."""
    if name == "data":
        return f"training data ({'dataset.path=' + str(cfg.dataset.path) if cfg.dataset.get('path') else 'built-in data'})"
    if name == "start":
        init_from = cfg.model.get("init_from")
        where = f"model.init_from={init_from}" if init_from else f"model.name_or_path={cfg.model.name_or_path}"
        return f"starting policy's weights or precision ({where})"
    return f"reward model's weights, precision or max_length ({name}={OmegaConf.select(cfg, name)})"


def save_final(context, model, inputs: StageInputs, trainer=None) -> Path:
    """final/: the trained adapter or model, the tokenizer, and what they stand on
    (`rlhf.lineage`); written by the main process only. A Trainer stage saves through its
    trainer, which gathers weights sharded across processes (FSDP, ZeRO-3) first."""
    final = context.run_dir / "final"
    fold_into_whole_model(model)
    if trainer is not None:
        trainer.save_model(str(final))  # every process takes part; the main one writes
    elif context.main_process:
        model.save_pretrained(str(final))
    if context.main_process:
        inputs.tokenizer.save_pretrained(str(final))
        write_final_lineage(final, inputs.lineage, context.cfg, inputs.head)
    return final


def trainer_kwargs(context, stage_cfg, inputs: StageInputs, evaluate: bool = True) -> dict:
    """The arguments every TRL trainer takes the same way: model, settings, data, tokenizer,
    LoRA config and the history callback; `evaluate=False` keeps the held-out split from TRL."""
    cfg, run_dir = context.cfg, context.run_dir
    held_out = inputs.data.eval if evaluate else None
    inputs.identity = inputs_identity(context, inputs)
    checkpoint = last_complete_checkpoint(run_dir) if cfg.get("resume", "auto") == "auto" else None
    if checkpoint is not None:  # before the trainer is built: TRL computes reference log-probs as it is
        refuse_other_inputs(checkpoint, read_json(checkpoint / CHECKPOINT_MARK, {}).get("inputs", {}), inputs.identity, cfg)
    score_labelled_positions_on_cpu()  # TRL's log-probs on the CPU: completions only, not prompt and padding
    return {
        "model": inputs.model,
        "args": training_args(cfg, stage_cfg, run_dir, has_eval=held_out is not None),
        "train_dataset": inputs.data.train,
        "eval_dataset": held_out,
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


class HistoryWriter(TrainerCallback):
    """Appends each log event of a transformers Trainer (train and eval) to history.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_history(self.path, {"step": state.global_step, "epoch": state.epoch, **logs})


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

    def __init__(self, trainer, identity: dict):
        self.trainer = trainer
        self.identity = identity  # the run's inputs (`inputs_identity`), recorded in every mark

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
        # A resumed Trainer restarts its loss total and TRL its token count at zero: the mark
        # carries both on (rlhf.compat says why no public counter serves).
        total, tokens = running_loss_total(self.trainer), trained_tokens(self.trainer)
        if checkpoint.is_dir() and state.is_world_process_zero:
            mark = {"step": state.global_step, "loss_total": total, "num_tokens": tokens, "inputs": self.identity}
            write_json(checkpoint / CHECKPOINT_MARK, mark)


class StopWhenAsked(TrainerCallback):
    """A preemption signal (rlhf.preemption) ends training after the step in progress, with a
    checkpoint at that step (whatever save_steps says); `fit` then raises Preempted."""

    at_step = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps and preemption.asked():  # every process asks at every step: it is collective
            control.should_save = control.should_training_stop = True
            self.at_step = state.global_step


def fold_into_whole_model(model) -> None:
    """A whole-model final/ (peft=none) must hold every update the model computes with: earlier
    runs' stacked adapters are folded into its weights before it is saved, in the weights' dtype
    (a bfloat16 full fine-tune keeps every weight, its own updates too, rounded to bfloat16).
    An adapter final/ leaves them where lineage.json says they are."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        fold_stacked_updates(model)


def fit(trainer, context, inputs: StageInputs) -> dict:
    """Train (resuming from the last complete checkpoint when there is one and resume=auto),
    evaluate on the held-out split, save the adapter/model and tokenizer to final/, and return
    the final metrics as one flat dict."""
    cfg, run_dir = context.cfg, context.run_dir
    dropped = dropped_by_trainer(trainer, inputs.data)
    identity = inputs.identity or inputs_identity(context, inputs)  # trainer_kwargs computed it and checked the checkpoint against it
    stop = StopWhenAsked()
    trainer.add_callback(stop)  # before RunGuard: the checkpoint it asks for is checked for finite weights too
    trainer.add_callback(RunGuard(trainer, identity))
    checkpoint, mark = resume_point(cfg, run_dir)
    if checkpoint is not None:
        restore_trained_tokens(trainer, mark["num_tokens"])
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if stop.at_step is not None:
        raise preemption.Preempted(stop.at_step)
    metrics = {
        **result.metrics,
        "data/skipped_rows": inputs.data.skipped_rows,
        "data/dropped_rows": dropped,
        **getattr(trainer, "run_metrics", {}),
    }  # what happened outside train(), e.g. DPO's reference log-probs
    if checkpoint is not None:  # the mean loss over all steps, not only those since the resume
        metrics["train_loss"] = (mark["loss_total"] + logged_loss_total(trainer)) / trainer.state.global_step
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    save_final(context, trainer.model, inputs, trainer=trainer)
    return metrics
