"""Policy evaluation: sample answers to held-out prompts from a trained policy and from its
reference (the policy it started from), and let a reward model judge them.

Reports the reward model's win rate of policy over reference (ties count half, with its 95%
Wilson interval), both mean scores and their paired difference (with its 95% t interval), the
mean KL(policy || reference) of the policy's own samples (sum over response tokens of
log pi - log ref: unbiased, because the tokens are the policy's samples), and the mean response
lengths. With `eval.judge_model=<rm run>` a second reward model - one the policy
was not optimised against, trained on other pairs - scores the same answers (`eval_judge_*`):
a proxy reward that rises while the judge's falls is over-optimisation (Gao et al. 2022).
Every generation goes to samples.jsonl in the run directory.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from rlhf.data import load_splits
from rlhf.errors import UserError
from rlhf.generation import SamplingSettings, as_reference, response_logprobs, sample, seeded
from rlhf.lifecycle import autocast, device_for, load_reward_model
from rlhf.lineage import POLICY_STAGES, TrainedRun
from rlhf.metrics import agreement, score_gain, wilson_interval


@dataclass
class EvalConfig(SamplingSettings):
    """Settings of `stage=eval` (conf/eval/default.yaml documents each key)."""

    policy: str | None = None
    reward_model: str | None = None
    judge_model: str | None = None
    num_prompts: int = 64
    batch_size: int = 16
    temperature: float = 0.7


def run(cfg, run_dir: Path) -> dict:
    settings = instantiate(cfg.eval)
    device = device_for(cfg)
    splits = load_splits(cfg.dataset, kind="prompt")
    prompts = [row["prompt"] for row in (splits.eval if splits.eval is not None else splits.train)][: settings.num_prompts]
    policy, reference, tokenizer = load_policy_and_reference(settings.policy, cfg)
    reward = load_reward_model(settings.reward_model, cfg, key="eval.reward_model")
    judge = load_reward_model(settings.judge_model, cfg, key="eval.judge_model") if settings.judge_model else None
    for model in (policy, reference, reward.model, judge.model if judge else None):
        if model is not None:
            model.to(device).eval()

    judges = {"": reward, **({"judge_": judge} if judge is not None else {})}
    with autocast(cfg, device):  # bfloat16 where the Trainer stages would use it (hardware.training_args.bf16)
        rows = answer_and_score(prompts, settings, device, (policy, reference, tokenizer), judges, cfg.seed)
    with open(run_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    metrics = {}
    for prefix in judges:  # eval_win_rate, eval_score_gain, ... and the same with eval_judge_
        metrics.update(judged(rows, prefix))
    keys = ("score_policy", "score_reference", "score_judge_policy", "score_judge_reference", "kl", "length_policy", "length_reference")
    metrics.update({f"eval_{key}": sum(row[key] for row in rows) / len(rows) for key in keys if key in rows[0]})
    cut = {f"data/{prefix}reward_cut_inputs": judge.cut_inputs for prefix, judge in judges.items()}  # rows cut to the RM's max_length
    return {**metrics, **cut, "eval_prompts": len(rows)}


def judged(rows: list, prefix: str) -> dict:
    """One reward model's verdict: the win rate of policy over reference (ties count half) with its
    95% Wilson interval, and the mean paired score difference with its 95% t interval (each prompt's
    two answers were sampled under the same seed)."""
    policy, reference = [row[f"score_{prefix}policy"] for row in rows], [row[f"score_{prefix}reference"] for row in rows]
    wins = sum(agreement(p - r) for p, r in zip(policy, reference))
    metrics = {f"eval_{prefix}win_rate": wins / len(rows), f"eval_{prefix}win_rate_ci95": wilson_interval(wins, len(rows))}
    return {**metrics, **score_gain(reference, policy, prefix=f"eval_{prefix}")}


def answer_and_score(prompts: list, settings, device, models: tuple, judges: dict, seed: int) -> list:
    """One row per prompt: the policy's and the reference's answers, each reward model's score of
    both (`judges`: prefix -> (model, tokenizer)), the KL of the policy's answer and both lengths.

    Both answers to a batch are sampled under the same seed (seed + the batch's first index):
    paired draws, and the same reference answers in every evaluation of policies that started
    from the same policy (an aligner comparison's SFT row)."""
    policy, reference, tokenizer = models
    # The KL of the distributions sampled from; greedy decoding (temperature 0) compares the
    # untempered ones rather than dividing the logits by ~0.
    kl_temperature = settings.temperature or 1.0
    rows = []
    for start in range(0, len(prompts), settings.batch_size):
        batch = prompts[start : start + settings.batch_size]
        with seeded(seed + start, device), as_reference(policy, reference) as ref:
            from_reference = sample(ref, tokenizer, batch, settings, device)
        with seeded(seed + start, device):
            from_policy = sample(policy, tokenizer, batch, settings, device)
        with as_reference(policy, reference) as ref:
            ref_logprobs = response_logprobs(ref, from_policy, kl_temperature)
        kl = ((response_logprobs(policy, from_policy, kl_temperature) - ref_logprobs) * from_policy.response_mask).sum(dim=1)
        scores = {}
        for prefix, judge in judges.items():
            scores[f"score_{prefix}policy"] = judge.scores(batch, from_policy.texts, device).tolist()
            scores[f"score_{prefix}reference"] = judge.scores(batch, from_reference.texts, device).tolist()
        for i, prompt in enumerate(batch):
            rows.append(
                {
                    "prompt": prompt,
                    "policy": from_policy.texts[i],
                    "reference": from_reference.texts[i],
                    **{key: values[i] for key, values in scores.items()},
                    "kl": kl[i].item(),
                    "length_policy": int(from_policy.response_mask[i].sum()),
                    "length_reference": int(from_reference.response_mask[i].sum()),
                }
            )
    return rows


def load_policy_and_reference(policy_run, cfg):
    """(policy, reference or None, tokenizer). The reference is the policy the run started
    from; for a LoRA run it is the same network with the run's adapter disabled (None)."""
    run = TrainedRun.of(policy_run, "eval.policy", stages=POLICY_STAGES)
    bias = OmegaConf.select(run.cfg, "peft.bias", default="none")
    if run.adapter is not None and bias != "none":  # see rlhf.validate.check_reference_bias
        raise UserError(
            f"eval.policy={policy_run}: trained with peft.bias={bias}, so its adapter disabled is not the policy it started from; "
            "retrain it with peft.bias=none to compare it with its start"
        )
    policy = run.load(cfg.hardware)
    reference = None if run.adapter is not None else run.start.load(cfg.hardware)
    return policy, reference, run.start.tokenizer()
