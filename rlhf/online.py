"""Online RL on TRL's trainers, shared by `stage=grpo` (GRPO, Shao et al. 2024) and `stage=rloo`
(RLOO, Ahmadian et al. 2024): the policy samples several answers per prompt, a reward model
and/or reward functions score them, and each answer's advantage is its reward against the other
answers to the same prompt - no value head, unlike PPO.

Rewards: `<stage>.reward_model=<rm run>` (the project's RM run, its lineage merged, frozen,
scored with its own tokenizer and chat template) and `<stage>.reward_functions` (rlhf.rewards,
each with a weight); either or both. Under LoRA the reference of the KL term is the policy with
its adapter disabled. TRL's log lines (reward, rewards/<function>/mean, kl, completions/*,
clip_ratio/*) go to history.jsonl, and their last values to metrics.json. The held-out prompts'
answers are scored before and after training by every reward, each on its own: the reward
model's mean score is `eval_scores_before` and `eval_scores`, their paired difference
`eval_score_gain` with `eval_score_gain_ci95`, as PPO names them; a reward function's the same
under `eval_<function>_` (`eval_answer_match_scores`: held-out exact-match accuracy).
"""

import time
from dataclasses import dataclass, field

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import TrainerCallback
from trl import GRPOConfig, RLOOConfig

from rlhf import distributed
from rlhf.compat import time_generate
from rlhf.errors import UserError
from rlhf.generation import held_out_answers, up_to_first_eos
from rlhf.lifecycle import fit, load_prompt_inputs, trainer_kwargs
from rlhf.metrics import paired_gain
from rlhf.reward_model import RewardModel, load_reward_model
from rlhf.rewards import RewardFunction, completion_text
from rlhf.settings import SamplingSettings

LOGGED = ("reward", "rewards/", "kl", "completions/", "clip_ratio", "entropy")  # TRL's log keys kept in metrics.json


@dataclass
class OnlineRewards:
    """The project's keys beside TRL's in `grpo.*` / `rloo.*` (conf/grpo/default.yaml documents each)."""

    reward_model: str | None = None
    reward_model_weight: float = 1.0
    reward_functions: dict = field(default_factory=dict)
    eval_prompts: int = 128
    max_prompt_length: int = 512


@dataclass
class GRPOSettings(GRPOConfig, OnlineRewards):
    """trl.GRPOConfig with the project's reward and held-out settings."""


@dataclass
class RLOOSettings(RLOOConfig, OnlineRewards):
    """trl.RLOOConfig with the project's reward and held-out settings."""


def run(context, trainer_class) -> dict:
    cfg, device = context.cfg, context.device
    stage = cfg.stage
    settings = cfg[stage]
    if not settings.reward_model and not settings.reward_functions:
        raise UserError(f"stage={stage} needs a reward: {stage}.reward_model=<rm run> and/or {stage}.reward_functions (rlhf/rewards.py)")
    # TRL's GRPO and RLOO trainers (1.x) sample from every prompt whole: one long dialogue (HH-RLHF
    # holds prompts of ~1600 tokens) made an update's memory and time follow the longest prompt
    # drawn (bench/results/history.md, "GRPO's memory and long prompts"). Fitted here, training and held-out scoring see the same prompts.
    inputs, cut_prompts = load_prompt_inputs(context, settings.max_prompt_length)
    functions = reward_functions(settings, inputs.data.train.column_names, stage)
    reward = load_reward_model(context.runs[f"{stage}.reward_model"], context) if settings.reward_model else None
    if reward is not None:
        reward.model.to(device)

    # TRL's settings get TRL's keys; the reward functions are built above, not by the settings object.
    trl_keys = OmegaConf.masked_copy(settings, [key for key in settings if key != "reward_functions"])
    kwargs = trainer_kwargs(context, trl_keys, inputs, evaluate=False)  # held-out scoring below, not TRL's eval loop
    # The reward model goes to TRL as a function, not as a model: TRL would score each row whole,
    # beyond the length the RM was trained on; `RewardModel.scores` cuts it as PPO and eval do.
    model_reward = [RewardModelFunction(reward, device, settings.reward_model_weight)] if reward is not None else []
    kwargs["args"].reward_weights = [function.weight for function in model_reward + functions]
    trainer = trainer_class(reward_funcs=model_reward + functions, **kwargs)

    score = held_out_scorer(context, settings, inputs, trainer, reward, functions)
    before = score() if score else None  # the starting policy (a resumed run measures it again, to the same scores)
    timer = PhaseTimer(trainer, reward.model if reward is not None else None)  # after the held-out scoring: it times training only
    cut_before_training = reward.cut_inputs if reward is not None else 0
    metrics = {**fit(trainer, context, inputs), **last_logged(trainer.state.log_history)}
    metrics.update(timer.per_update(metrics))
    cut_in_training = reward.cut_inputs - cut_before_training if reward is not None else 0  # this process's answers only
    metrics["data/cut_prompts"] = cut_prompts
    if score:  # the same prompts and seeds before and after
        (scores_before, lengths_before), (scores_after, lengths_after) = before, score()
        for prefix, after in scores_after.items():
            # a function may abstain: the prompts both of whose answers it scored
            kept = [i for i, (b, a) in enumerate(zip(scores_before[prefix], after)) if b is not None and a is not None]
            lengths = ([lengths_before[i] for i in kept], [lengths_after[i] for i in kept])
            metrics.update(paired_gain([scores_before[prefix][i] for i in kept], [after[i] for i in kept], prefix, lengths) if kept else {})
    if reward is not None:  # rows longer than the reward model was trained on, cut to its rm.max_length: every process's
        # training answers, and the held-out answers once (each process scores all of them, the same ones)
        trained = int(distributed.all_sum(torch.tensor(float(cut_in_training))).item())
        metrics["data/reward_cut_inputs"] = reward.cut_inputs - cut_in_training + trained
    return metrics


class RewardModelFunction(RewardFunction):
    """The reward model as TRL calls a reward function: each (prompt, completion) templated with the
    RM's tokenizer, cut from the left to its rm.max_length, scored at its last token."""

    name = "reward_model"  # TRL logs rewards/reward_model/mean

    def __init__(self, reward: RewardModel, device, weight: float):
        super().__init__(weight)
        self.reward, self.device = reward, device

    def __call__(self, prompts, completions, **columns) -> list:
        return self.reward.scores(prompts, [completion_text(completion) for completion in completions], self.device).tolist()


class PhaseTimer(TrainerCallback):
    """Where an update's time goes: sampling (the policy's `generate`) and scoring (the reward
    model's forward pass), timed from the outside; the rest is the policy and reference passes
    and the optimizer step. Reported per update this process ran, as PPO reports its phases."""

    def __init__(self, trainer, reward_model):
        self.seconds, self.updates, self.tokens = {"generation": 0.0, "scoring": 0.0}, 0, 0
        # what ends an answer in TRL's completion mask (an attribute of TRL's trainers, not an argument)
        self.eos_token_ids = getattr(trainer, "eos_token_ids", [trainer.processing_class.eos_token_id])
        time_generate(trainer.model, self.sampled)
        if reward_model is not None:
            reward_model.register_forward_pre_hook(lambda *_: setattr(self, "scoring_start", time.perf_counter()))
            reward_model.register_forward_hook(
                lambda *_: self.seconds.update(scoring=self.seconds["scoring"] + time.perf_counter() - self.scoring_start)
            )
        trainer.add_callback(self)

    def sampled(self, seconds: float, prompt_length: int | None, sequences) -> None:
        """One `generate` call of this process: its time, and its answers' tokens up to their first EOS."""
        self.seconds["generation"] += seconds
        if prompt_length is not None and sequences.shape[1] > prompt_length:
            self.tokens += int(up_to_first_eos(sequences[:, prompt_length:], self.eos_token_ids).sum())

    def on_step_end(self, args, state, control, **kwargs):
        self.updates += 1

    def per_update(self, metrics: dict) -> dict:
        """time/<phase>_per_update, and this process's answer tokens per second of its sampling
        (as PPO counts them: with N processes the job samples about N times as many)."""
        if not self.updates or "train_runtime" not in metrics:
            return {}
        phases = {f"time/{phase}_per_update": seconds / self.updates for phase, seconds in self.seconds.items()}
        phases["time/training_per_update"] = metrics["train_runtime"] / self.updates - sum(phases.values())
        if self.seconds["generation"] > 0:
            phases["time/generated_tokens_per_second"] = self.tokens / self.seconds["generation"]
        return phases


def held_out_scorer(context, settings, inputs, trainer, reward, functions):
    """A function scoring the policy's answer to each held-out prompt (the split's first
    `eval_prompts`) with every reward the stage trains on, each on its own: {"eval_": reward-model
    scores, "eval_<function>_": that function's values (None where it abstains)}; None without a
    held-out split. Answers are sampled as TRL's trainer samples them (its temperature, top_p,
    top_k, min_p and repetition penalty, nothing from the checkpoint), under seeds that repeat on
    every call."""
    if inputs.data.eval is None or settings.eval_prompts == 0:
        return None
    rows = inputs.data.eval.select(range(min(settings.eval_prompts, len(inputs.data.eval))))
    held_out = list(rows["prompt"])
    columns = {name: list(rows[name]) for name in rows.column_names if name != "prompt"}  # what TRL hands reward functions
    args, device = trainer.args, context.device
    sampling = SamplingSettings(settings.max_prompt_length, args.max_completion_length, args.temperature, args.top_p)
    trl_sampler = {"top_k": args.top_k, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty}
    batch_size = args.per_device_eval_batch_size

    def score() -> tuple:
        with context.autocast():  # bfloat16 where the Trainer stages would use it
            answers, lengths, _ = held_out_answers(
                trainer.model, inputs.tokenizer, held_out, sampling, device, batch_size, context.cfg.seed, **trl_sampler
            )
            scores = {}
            if reward is not None:
                scores["eval_"] = reward.batched_scores(held_out, answers, device, batch_size)
        for function in functions:
            scores[f"eval_{function.name}_"] = function(held_out, answers, **columns)
        return scores, lengths

    return score


def reward_functions(settings, columns: list, stage: str) -> list:
    """The configured reward functions, each checked against the data's columns."""
    functions = []
    for name, node in (settings.reward_functions or {}).items():
        function = instantiate(node)
        column = getattr(function, "column", None)
        if column is not None and column not in columns:
            raise UserError(
                f"{stage}.reward_functions.{name}: reads the dataset column '{column}', which this data lacks ({', '.join(columns)})"
            )
        functions.append(function)
    return functions


def last_logged(log_history: list) -> dict:
    """The last training-time value of each of TRL's reward, KL, length and clipping metrics."""
    last = {}
    for line in log_history:
        last.update({key: value for key, value in line.items() if key.startswith(LOGGED)})
    return last
