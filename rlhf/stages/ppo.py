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

import torch
from hydra.utils import instantiate
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import set_seed

from rlhf import distributed
from rlhf.lifecycle import load_prompt_inputs, resume_or_start, save_final
from rlhf.metrics import paired_gain
from rlhf.ppo.trainer import PPOModels, PPOTrainer, ValueHead
from rlhf.reward_model import load_reward_model
from rlhf.tracking import UpdateLog


def run(context) -> dict:
    # Under torchrun / accelerate launch: one process group for the run, by where it computes -
    # nccl between GPUs, gloo between CPU processes (hardware=cpu on a machine with GPUs included).
    with distributed.process_group("nccl" if context.device.type == "cuda" else "gloo"):
        return train_ppo(context)


def train_ppo(context) -> dict:
    cfg, run_dir, device = context.cfg, context.run_dir, context.device
    settings = instantiate(cfg.ppo)  # validate() has checked ppo.reward_model
    inputs, cut_prompts = load_prompt_inputs(context, settings.max_prompt_length)
    held_out = [row["prompt"] for row in inputs.data.eval][: settings.eval_prompts] if inputs.data.eval is not None else []
    train_prompts = [row["prompt"] for row in inputs.data.train]
    identity, checkpoint, mark = resume_or_start(context, inputs, train_prompts, held_out)  # before the reward model loads
    models = ppo_models(context, inputs)  # rlhf.command has seeded the run: the value head starts the same every run

    log = UpdateLog(cfg, run_dir)
    trainer = PPOTrainer(models, settings, device, log=log)  # rank 0's trainable weights on every process
    set_seed(cfg.seed + distributed.rank())  # each process samples its own responses
    with context.autocast():  # bfloat16 where the Trainer stages would use it (hardware.training_args.bf16)
        if checkpoint is not None:  # an interrupted run: go on from its last complete checkpoint
            kept = trainer.resume(checkpoint, mark)
        else:  # the held-out prompts are sampled under the same seeds before and after: paired scores
            kept = dict(identity)
            if held_out:
                kept["held_out_before"], kept["held_out_lengths_before"], _ = trainer.score_held_out(held_out, cfg.seed)
        metrics = trainer.train(train_prompts, seed=cfg.seed, checkpoints=run_dir / "checkpoints", keep=kept)
        if held_out:
            scores, lengths, kls = trainer.score_held_out(held_out, cfg.seed, measure_kl=True)
            before_lengths = kept.get("held_out_lengths_before")  # None in a checkpoint written before lengths were kept
            metrics.update(paired_gain(kept["held_out_before"], scores, lengths=(before_lengths, lengths) if before_lengths else None))
            metrics["eval_kl"] = sum(kls) / len(kls)  # the held-out answers' KL to the reference, as objective/kl measures it
    metrics["data/skipped_rows"] = inputs.data.skipped_rows
    metrics["data/cut_prompts"] = cut_prompts
    # (prompt, response) rows longer than the reward model was trained on, cut to its rm.max_length, over every process
    metrics["data/reward_cut_inputs"] = int(distributed.all_sum(torch.tensor(float(models.reward.cut_inputs))).item())

    final = save_final(context, models.policy, inputs)
    if context.main_process:
        save_file(models.value_head.state_dict(), str(final / "value_head.safetensors"))  # apart: final/ loads as a plain policy
    log.close()
    return metrics


def ppo_models(context, inputs) -> PPOModels:
    """The policy (the starting model with a fresh adapter, or the whole model), its reference,
    a new value head and the frozen reward model, on the run's device."""
    reward = load_reward_model(context.runs["ppo.reward_model"], context)
    if inputs.peft_config is not None:
        policy, reference = get_peft_model(inputs.model, inputs.peft_config), None  # reference = adapter disabled
    else:
        reference = copy.deepcopy(inputs.model).requires_grad_(False).eval()  # full fine-tuning: a frozen copy
        policy = inputs.model
    models = PPOModels(policy, reference, ValueHead(policy.config.hidden_size), inputs.tokenizer, reward)
    for module in (models.policy, models.reference, models.value_head, models.reward.model):
        if module is not None:
            module.to(context.device)
    return models
