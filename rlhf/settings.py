"""The settings classes that are the project's own (the sampling part PPO and eval share, eval's),
and which values every settings node accepts: each node's rules beside its settings, read by
rlhf/validate.py before anything heavy loads. PPO's settings and rules are in rlhf/ppo/settings.py.
Imports neither torch nor trl: validation and `--cfg` stay fast."""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    test: object  # value -> bool
    allowed: str  # what the message says is allowed
    integer: bool = False  # the value must be a whole number
    none_ok: bool = False  # null means "off" or "the default"


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def between(low, high, low_open=False, high_open=False):
    return lambda v: (v > low if low_open else v >= low) and (v < high if high_open else v <= high)


POSITIVE = Rule(lambda v: v > 0, "> 0")
NON_NEGATIVE = Rule(lambda v: v >= 0, ">= 0")
AT_LEAST_ONE = Rule(lambda v: v >= 1, "an integer >= 1", integer=True)
UNIT = Rule(between(0, 1), "in [0, 1]")
# PPO's and eval's log-probs and KL are those of the whole tempered softmax: nucleus sampling would draw from another distribution.
WHOLE_SOFTMAX = Rule(lambda v: v == 1, "1.0: the log-probs and KL are those of the whole tempered softmax; lower the temperature instead")
OPTIONAL_LENGTH = Rule(lambda v: v >= 1, "an integer >= 1 (or null)", integer=True, none_ok=True)

# Keys every stage node (sft, rm, dpo, ppo, any later one) and hardware.training_args may hold.
STAGE_RULES = {
    **dict.fromkeys(("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"), AT_LEAST_ONE),
    **dict.fromkeys(("warmup_steps", "weight_decay", "max_grad_norm"), NON_NEGATIVE),
    "learning_rate": POSITIVE,
    "max_length": OPTIONAL_LENGTH,
    "eval_prompts": Rule(lambda v: v >= 0, "an integer >= 0 (0 = no held-out scoring)", integer=True),  # PPO, GRPO, RLOO
}
# dpo.*: trl's DPOConfig with the project's kl_coef (rlhf/dpo_trainer.py)
DPO_RULES = {"beta": POSITIVE, "label_smoothing": Rule(between(0, 0.5, high_open=True), "in [0, 0.5)"), "kl_coef": NON_NEGATIVE}
PEFT_RULES = {"r": AT_LEAST_ONE, "alpha": POSITIVE, "dropout": Rule(between(0, 1, high_open=True), "in [0, 1)")}
DATASET_RULES = {
    "test_size": Rule(lambda v: v >= 0 and (v < 1 or float(v).is_integer()), ">= 0: a fraction below 1 or a count of rows"),
    "max_samples": OPTIONAL_LENGTH,
    "skip_rows": Rule(lambda v: v >= 0, "an integer >= 0", integer=True),
}


@dataclass
class SamplingSettings:
    """How responses are sampled: the part of `ppo.*` and `eval.*` that `rlhf.generation.sample` reads."""

    max_prompt_length: int = 128
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class EvalConfig(SamplingSettings):
    """Settings of `stage=eval`, defaulting to what conf/eval/default.yaml gives a real model (a
    test holds them equal; the YAML documents each key)."""

    policy: str | None = None
    reward_model: str | None = None
    judge_model: str | None = None
    num_prompts: int = 64
    batch_size: int = 16
    max_prompt_length: int = 512
    max_new_tokens: int = 128
    temperature: float = 0.7
    ref_cache: bool = True


EVAL_RULES = {
    **dict.fromkeys(("num_prompts", "batch_size", "max_prompt_length", "max_new_tokens"), AT_LEAST_ONE),
    "temperature": Rule(lambda v: v >= 0, ">= 0 (0 = greedy decoding)"),
    "top_p": WHOLE_SOFTMAX,
}
