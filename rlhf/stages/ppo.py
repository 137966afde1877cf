"""PPO against a trained reward model (Ouyang et al. 2022), with the project's own PPO
(`rlhf.ppo`): trl no longer ships one.

The policy carries a scalar value head; the reference is the starting policy (under LoRA the
same network with its adapter disabled; with peft=none a frozen copy). Start from an SFT run
with `model.init_from=<sft run>` and name the reward model with `ppo.reward_model=<rm run>`.
final/ holds the policy adapter (or model), the tokenizer and value_head.safetensors. Every
`ppo.save_steps` updates a checkpoint holds what an interrupted run needs to go on exactly as
an uninterrupted one would (weights, optimizer, KL coefficient, random state).
"""

import copy
from pathlib import Path

from hydra.utils import instantiate
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import set_seed

from rlhf.errors import UserError
from rlhf.ppo.trainer import PPOTrainer, ValueHead
from rlhf.runs import is_main_process, last_complete_checkpoint
from rlhf.training import (
    append_history, device_for, finish_tracking, load_inputs, load_reward_model, open_wandb_run, start_tracking,
    truncate_history,
)


def run(cfg, run_dir: Path) -> dict:
    settings = instantiate(cfg.ppo)
    if not settings.reward_model:
        raise UserError("stage=ppo needs ppo.reward_model=<directory of a finished stage=rm run>")
    device = device_for(cfg)
    set_seed(cfg.seed)
    inputs = load_inputs(cfg, data_kind="prompt")
    if len(inputs.data.train) < settings.batch_size:
        raise UserError(f"ppo.batch_size={settings.batch_size}: the training split has only {len(inputs.data.train)} prompts")
    reward_model, reward_tokenizer = load_reward_model(settings.reward_model, cfg)

    if inputs.peft_config is not None:
        policy, reference = get_peft_model(inputs.model, inputs.peft_config), None  # reference = adapter disabled
    else:
        reference = copy.deepcopy(inputs.model).requires_grad_(False).eval()  # full fine-tuning: a frozen copy
        policy = inputs.model
    value_head = ValueHead(policy.config.hidden_size)
    for module in (policy, reference, value_head, reward_model):
        if module is not None:
            module.to(device)

    start_tracking(cfg, run_dir)
    trainer = PPOTrainer(
        policy, reference, value_head, inputs.tokenizer, reward_model, reward_tokenizer, settings, device,
        log=lambda record: log_update(run_dir, record),
    )
    held_out = [row["prompt"] for row in inputs.data.eval] if inputs.data.eval is not None else []
    checkpoint = last_complete_checkpoint(run_dir) if cfg.get("resume", "auto") == "auto" else None
    if checkpoint is not None:  # an interrupted run: go on from its last complete checkpoint
        print(f"resuming from {checkpoint}", flush=True)
        metrics = trainer.resume(checkpoint)
    else:
        metrics = {"eval_scores_before": trainer.mean_score(held_out)} if held_out else {}
    if is_main_process():  # lines logged after the checkpoint (or by a run that crashed before one) are logged again
        truncate_history(run_dir / "history.jsonl", after_step=trainer.done_updates)
    train_prompts = [row["prompt"] for row in inputs.data.train]
    metrics.update(trainer.train(train_prompts, seed=cfg.seed, checkpoints=run_dir / "checkpoints", keep=metrics))
    if held_out:
        metrics["eval_scores"] = trainer.mean_score(held_out)
    metrics["data/skipped_rows"] = inputs.data.skipped_rows

    final = run_dir / "final"
    policy.save_pretrained(final)
    inputs.tokenizer.save_pretrained(final)
    save_file(value_head.state_dict(), str(final / "value_head.safetensors"))
    finish_tracking(metrics)
    return metrics


def log_update(run_dir: Path, record: dict) -> None:
    append_history(run_dir / "history.jsonl", record)
    print(" ".join(f"{key}={value:.4g}" for key, value in record.items()), flush=True)
    wandb = open_wandb_run()
    if wandb is not None:
        wandb.log(record, step=record["step"])
