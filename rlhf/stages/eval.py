"""Policy evaluation: sample answers to held-out prompts from a trained policy and from its
reference (the policy it started from), and let a reward model judge them.

Reports the reward model's win rate of policy over reference (ties count half, with its 95%
Wilson interval), both mean scores and their paired difference (with its 95% t interval), the
mean KL(policy || reference) of the policy's own samples (`rlhf.generation.sampled_kl`, the
estimator PPO's penalty and logs use), and the mean response lengths. The KL is measured where the
policy's stage measured it: on answers sampled at the temperature it trained on (its
`<stage>.temperature`; 1.0, the model's own distribution, for SFT and DPO), so that `eval_kl` of
a PPO run is the quantity its `ppo.target` steers. Where eval samples at another temperature
(`eval.temperature`, 0.7 by default), the policy answers each prompt once more at the training
temperature for `eval_kl`, and the KL of the judged answers themselves is
`eval_kl_at_sampling_temperature` (the two differ: a lower temperature sharpens both
distributions). With `eval.judge_model=<rm run>` a second reward model - one the policy
was not optimised against, trained on other pairs - scores the same answers (`eval_judge_*`):
a proxy reward that rises while the judge's falls is over-optimisation (Gao et al. 2022).
Every generation goes to samples.jsonl in the run directory.

Every evaluation of a policy that started from the same one draws the same reference answers
(same prompts, seeds and settings): the project's cache keeps them with each reward model's
scores (`eval.ref_cache`), so a comparison of several aligners from one SFT run, or a sweep's
evaluations, samples and scores the reference once (`eval_reference_from_cache` says which).
"""

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from rlhf import package_versions
from rlhf.cache import EVAL_REFERENCES, cache_dir
from rlhf.data import load_splits
from rlhf.errors import UserError
from rlhf.generation import as_reference, fit_prompts, sample, sampled_kl, seeded
from rlhf.lineage import TrainedRun
from rlhf.metrics import agreement, length_controlled_gain, score_gain, wilson_interval
from rlhf.reward_model import load_reward_model
from rlhf.runs import read_json, write_json
from rlhf.settings import EvalConfig  # noqa: F401  (the _target_ configs saved before named rlhf.stages.eval.EvalConfig)


def run(context) -> dict:
    cfg, device = context.cfg, context.device
    settings = instantiate(cfg.eval)
    splits = load_splits(cfg.dataset, kind="prompt")
    prompts = [row["prompt"] for row in (splits.eval if splits.eval is not None else splits.train)][: settings.num_prompts]
    trained = context.runs["eval.policy"]
    tokenizer = trained.start.tokenizer()
    # Whole turns cut to max_prompt_length: both policies sample from the conversation the judges score.
    prompts, cut_prompts = fit_prompts(prompts, tokenizer, settings.max_prompt_length, "eval.max_prompt_length")
    policy, reference = load_policy_and_reference(trained, cfg)
    kl_temperature = training_temperature(trained)  # the temperature eval_kl is measured at
    models = (policy, reference, tokenizer)
    reward = load_reward_model(context.runs["eval.reward_model"], context)
    judge = load_reward_model(context.runs["eval.judge_model"], context) if settings.judge_model else None
    for model in (policy, reference, reward.model, judge.model if judge else None):
        if model is not None:
            model.to(device).eval()

    judges = {"": reward, **({"judge_": judge} if judge is not None else {})}
    cache = reference_cache_path(trained, tokenizer, settings, prompts, context) if settings.ref_cache else None
    with context.autocast():  # bfloat16 where the Trainer stages would use it (hardware.training_args.bf16)
        started = time.perf_counter()
        references = reference_answers(prompts, settings, device, models, judges, cfg.seed, cache)
        reference_seconds = time.perf_counter() - started
        rows = answer_and_score(prompts, settings, device, models, judges, cfg.seed, references, kl_temperature)
    with open(context.run_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    metrics = {}
    for prefix in judges:  # eval_win_rate, eval_score_gain, ... and the same with eval_judge_
        metrics.update(judged(rows, prefix))
    keys = ("score_policy", "score_reference", "score_judge_policy", "score_judge_reference", "kl", "kl_at_sampling_temperature")
    keys += ("length_policy", "length_reference")
    metrics.update({f"eval_{key}": sum(row[key] for row in rows) / len(rows) for key in keys if key in rows[0]})
    metrics["eval_kl_temperature"] = kl_temperature  # what eval_kl was measured at
    cut = {f"data/{prefix}reward_cut_inputs": judge.cut_inputs for prefix, judge in judges.items()}  # rows cut to the RM's max_length
    return {
        **metrics,
        **cut,
        "eval_prompts": len(rows),
        "data/cut_prompts": cut_prompts,
        "eval_reference_from_cache": int(references["from_cache"]),
        "time/reference_answers": reference_seconds,
    }


def judged(rows: list, prefix: str) -> dict:
    """One reward model's verdict: the win rate of policy over reference (ties count half) with its
    95% Wilson interval, the mean paired score difference with its 95% t interval (each prompt's
    two answers were sampled under the same seed), and that difference at equal answer length
    (`length_controlled_gain`: `eval_<prefix>score_gain_lc`, the mean length change)."""
    policy, reference = [row[f"score_{prefix}policy"] for row in rows], [row[f"score_{prefix}reference"] for row in rows]
    wins = sum(agreement(p - r) for p, r in zip(policy, reference))
    metrics = {f"eval_{prefix}win_rate": wins / len(rows), f"eval_{prefix}win_rate_ci95": wilson_interval(wins, len(rows))}
    lengths = ([row["length_reference"] for row in rows], [row["length_policy"] for row in rows])
    controlled = length_controlled_gain(reference, policy, *lengths, prefix=f"eval_{prefix}")
    return {**metrics, **score_gain(reference, policy, prefix=f"eval_{prefix}"), **controlled}


def answer_and_score(
    prompts: list, settings, device, models: tuple, judges: dict, seed: int, references: dict, kl_temperature: float
) -> list:
    """One row per prompt: the policy's and the reference's answers (`references`), each reward
    model's score of both (`judges`: prefix -> RewardModel), the KL of the policy's answers at
    `kl_temperature` (the one it trained at: see the module's docstring) and both lengths. Both
    answers to a batch are sampled under the same seed (seed + the batch's first index): paired
    draws."""
    policy, reference, tokenizer = models
    at_kl_temperature = dataclasses.replace(settings, temperature=kl_temperature)
    rows = []
    for start in range(0, len(prompts), settings.batch_size):
        batch = prompts[start : start + settings.batch_size]
        with seeded(seed + start, device):
            from_policy = sample(policy, tokenizer, batch, settings, device)
        kl = {}
        if settings.temperature != kl_temperature:
            if settings.temperature > 0:  # greedy answers are no sample of any distribution: no KL of them
                kl["kl_at_sampling_temperature"] = sampled_kl(policy, reference, from_policy, settings.temperature)
            with seeded(seed + start, device):
                for_kl = sample(policy, tokenizer, batch, at_kl_temperature, device)
        else:
            for_kl = from_policy
        kl["kl"] = sampled_kl(policy, reference, for_kl, kl_temperature)
        scores = {f"score_{prefix}policy": judge.scores(batch, from_policy.texts, device).tolist() for prefix, judge in judges.items()}
        for i, prompt in enumerate(batch):
            row = start + i
            rows.append(
                {
                    "prompt": prompt,
                    "policy": from_policy.texts[i],
                    "reference": references["texts"][row],
                    **{key: values[i] for key, values in scores.items()},
                    **{f"score_{prefix}reference": references["scores"][judge.identity]["scores"][row] for prefix, judge in judges.items()},
                    **{key: values[i].item() for key, values in kl.items()},
                    "length_policy": int(from_policy.response_mask[i].sum()),
                    "length_reference": references["lengths"][row],
                }
            )
    return rows


def training_temperature(run: TrainedRun) -> float:
    """The temperature the policy's stage sampled its training answers at (PPO, GRPO, RLOO:
    `<stage>.temperature`); 1.0 - the model's own distribution - for stages trained on given
    answers (SFT, DPO)."""
    return float(OmegaConf.select(run.cfg, f"{run.cfg.stage}.temperature", default=None) or 1.0)


def reference_answers(prompts: list, settings, device, models: tuple, judges: dict, seed: int, cache: Path | None) -> dict:
    """The reference's answers to `prompts` ("texts", "lengths"), sampled batch by batch under the
    seeds the policy's answers use, and each judge's scores of them ("scores": judge identity ->
    {"scores", "cut"}). Every evaluation of a policy that started from the same one (the aligners
    of a comparison, a sweep's runs) draws the same reference answers: `cache`, where given, keeps
    them and their scores, so that later evaluations read them instead of sampling them again."""
    policy, reference, tokenizer = models
    entry = read_json(cache, default=None) if cache is not None else None
    fresh = not holds_answers(entry, len(prompts))  # none yet, or a damaged file: sampled again, and replaced
    if fresh:
        entry = {"texts": [], "lengths": [], "scores": {}}
        for start in range(0, len(prompts), settings.batch_size):
            with seeded(seed + start, device), as_reference(policy, reference) as ref:
                answers = sample(ref, tokenizer, prompts[start : start + settings.batch_size], settings, device)
            entry["texts"] += answers.texts
            entry["lengths"] += answers.response_mask.sum(dim=1).int().tolist()
    else:
        print(f"eval: the reference's answers to {len(prompts)} prompts read from {cache}", flush=True)
    scored = False
    for judge in judges.values():
        known = entry["scores"].get(judge.identity)
        if isinstance(known, dict) and len(known.get("scores", ())) == len(prompts) and isinstance(known.get("cut"), int):
            judge.cut_inputs += known["cut"]  # the rows its scores were computed from, as if scored now
            continue
        cut_before = judge.cut_inputs
        scores = judge.batched_scores(prompts, entry["texts"], device, settings.batch_size)
        entry["scores"][judge.identity] = {"scores": scores, "cut": judge.cut_inputs - cut_before}
        scored = True
    if cache is not None and (fresh or scored):
        write_json(cache, entry)
    entry["from_cache"] = not fresh
    return entry


def holds_answers(entry, count: int) -> bool:
    """Whether a cache entry read back holds `count` reference answers and their lengths."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("scores"), dict)
        and all(isinstance(entry.get(key), list) and len(entry[key]) == count for key in ("texts", "lengths"))
    )


def reference_cache_path(run: TrainedRun, tokenizer, settings, prompts: list, context) -> Path:
    """Where the reference answers of this evaluation are kept: keyed by everything they depend on
    (the reference's weights and precision, its tokenizer, the prompts, the sampling settings and
    seed, the device type and the libraries that sample)."""
    key = json.dumps(
        {
            "reference": run.start.identity(context.precision, run.quantization),
            "tokenizer": [tokenizer.name_or_path, len(tokenizer), tokenizer.chat_template],
            "prompts": hashlib.sha256(json.dumps(prompts, ensure_ascii=False, sort_keys=True).encode()).hexdigest(),
            "sampling": [
                settings.max_prompt_length,
                settings.max_new_tokens,
                settings.temperature,
                settings.top_p,
                settings.batch_size,
                context.cfg.seed,
            ],
            "device": context.device.type,
            "versions": package_versions(["torch", "transformers"]),
        },
        sort_keys=True,
        default=str,
    )
    return cache_dir() / EVAL_REFERENCES / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def load_policy_and_reference(run: TrainedRun, cfg):
    """(policy, reference or None). The reference is the policy the run started from; for a LoRA
    run it is the same network with the run's adapter disabled (None)."""
    bias = OmegaConf.select(run.cfg, "peft.bias", default="none")
    if run.adapter is not None and bias != "none":  # see rlhf.validate.check_reference_bias
        raise UserError(
            f"eval.policy={run.final.parent}: trained with peft.bias={bias}, so its adapter disabled is not the policy it started from; "
            "retrain it with peft.bias=none to compare it with its start"
        )
    policy = run.load(cfg.hardware, run.quantization)  # a QLoRA adapter over the 4-bit base it trained on
    reference = None if run.adapter is not None else run.start.load(cfg.hardware)
    return policy, reference
