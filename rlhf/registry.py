"""The one registry of what each stage is: what its final/ holds, which earlier runs it reads, its
KL-strength setting. Every list of stages elsewhere is derived from STAGES. Data only: it imports
nothing of the project, so that any module may read it (validation reads it before anything heavy
loads) and none imports upwards to reach it; the stage modules themselves are in rlhf/stages/.
"""

from dataclasses import dataclass, field

POLICY = "policy"  # final/ holds a policy: a causal LM (adapter) that a later run may start from
REWARD_MODEL = "reward model"  # final/ holds a sequence classifier scoring (prompt, response)


@dataclass(frozen=True)
class Stage:
    makes: str | None  # what final/ holds (POLICY, REWARD_MODEL), or None: scores only, or other runs (chain)
    reads: dict = field(default_factory=dict)  # setting naming an earlier run -> (what that run made, whether the stage needs it)
    strength: str | None = None  # the setting of the stage's distance from its reference (the aligner comparison's label)
    reference: bool = False  # under LoRA its reference is the starting policy, the adapter disabled
    strength_zero_drops_reference: bool = False  # with strength 0 it computes no KL term and needs no reference
    steps: bool = False  # it runs other stages, each as a run of its own (chain): validated, reused and resumed step by step
    own_loop: bool = False  # it logs from a loop of its own (PPO, eval), not through transformers' Trainer and its callbacks


STAGES = {
    "sft": Stage(makes=POLICY),
    "rm": Stage(makes=REWARD_MODEL),
    "dpo": Stage(makes=POLICY, strength="beta", reference=True),
    "ppo": Stage(makes=POLICY, strength="kl_coef", reference=True, reads={"ppo.reward_model": (REWARD_MODEL, True)}, own_loop=True),
    "grpo": Stage(
        makes=POLICY,
        strength="beta",
        reference=True,
        strength_zero_drops_reference=True,
        reads={"grpo.reward_model": (REWARD_MODEL, False)},  # or reward functions alone
    ),
    "rloo": Stage(
        makes=POLICY,
        strength="beta",
        reference=True,
        strength_zero_drops_reference=True,
        reads={"rloo.reward_model": (REWARD_MODEL, False)},
    ),
    "eval": Stage(
        makes=None,
        reads={"eval.policy": (POLICY, True), "eval.reward_model": (REWARD_MODEL, True), "eval.judge_model": (REWARD_MODEL, False)},
        own_loop=True,
    ),
    "chain": Stage(makes=None, steps=True),  # its steps are runs of the stages above
}
EVERY_STAGE_READS = {"model.init_from": (POLICY, False)}  # any stage may start from a finished policy run


def making(what: str) -> tuple:
    """The stages whose final/ holds `what` (POLICY or REWARD_MODEL)."""
    return tuple(name for name, stage in STAGES.items() if stage.makes == what)


def runs_steps(name) -> bool:
    """Whether stage `name` runs other stages as its steps (False for an unknown name)."""
    return name in STAGES and STAGES[name].steps


def available_stages() -> list:
    return sorted(STAGES)


# Settings classes that moved: the `_target_` a run saved then -> the one conf/ names now. The old
# names still import (aliases), and a saved config naming one is the same config as today's
# (`rlhf.runs.comparable`): a sweep or chain re-run after the move does not retrain what finished.
RENAMED_TARGETS = {
    "rlhf.trainers.KLDPOConfig": "rlhf.dpo_trainer.KLDPOConfig",
    "rlhf.ppo.trainer.PPOConfig": "rlhf.ppo.settings.PPOConfig",
    "rlhf.stages.eval.EvalConfig": "rlhf.settings.EvalConfig",
}
