"""The stages, and the one registry of what each is: every list of stages elsewhere is derived
from STAGES. A stage module here, named as `stage=<name>` selects it, defines

    run(cfg, run_dir: pathlib.Path) -> dict   # trains, saves <run_dir>/final, returns final metrics

Adding a stage takes that module, its `conf/stage/<name>.yaml` (and `conf/<name>/` settings) and
its entry in STAGES. `chain` runs other stages as steps (rlhf/chain.py); it has an entry too.

Importing this package imports no stage module (and so no torch): validation reads the registry
before anything heavy loads.
"""

import importlib
from dataclasses import dataclass, field

from rlhf.errors import UserError

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


def get_stage(name: str):
    """The `run` function of stage `name`; an unknown name lists the valid ones. (`chain` runs
    through rlhf.chain, which needs the run machinery: rlhf.command dispatches it.)"""
    if name not in STAGES or STAGES[name].steps:
        raise UserError(f"stage={name} is not a stage; valid stages: {', '.join(available_stages())}")
    return importlib.import_module(f"{__name__}.{name}").run
