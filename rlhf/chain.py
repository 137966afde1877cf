"""A pipeline of stages in one command (`experiment=rlhf_chain`: SFT -> RM -> PPO).

Each step of `chain.steps` is a list of overrides composed with conf/config.yaml exactly as if
typed after `python train.py`, and runs in its own complete run directory <run dir>/<step>/.
In a step's overrides, "@<step>" stands for the run directory of an earlier step, so a stage
starts from the one before it (`model.init_from=@sft`, `ppo.reward_model=@rm`).

Overrides given on the chain's command line reach every step, except another stage's
hyperparameters (`ppo.kl_coef=0.05` reaches only the ppo step). A step whose directory already
holds a finished run with the same config is skipped, so a failed chain resumes where it broke;
any other step directory is claimed as a single run's is (an interrupted step of the same config
resumes, one of another config is refused unless resume=overwrite, which starts it over).
At the end the steps are compared as `python -m rlhf.compare <run dir>` compares them: a table,
compare.csv and report.html in the run directory (for experiment=compare_aligners also
compare_aligners.csv and frontier.png).
"""

import json
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from rlhf import compare
from rlhf.compose import compose
from rlhf.errors import UserError
from rlhf.registry import available_stages
from rlhf.runs import finished_with, holding_run_dir, is_main_process, prepare_run_dir

STEP_REFERENCE = "@"
NOT_INHERITED = ("experiment", "stage", "chain", "hydra", "run_name")


def run(cfg, run_dir: Path, run_stage) -> dict:
    """Run every step with `run_stage(step_cfg, step_dir, overrides)`: the path a single run takes."""
    if not cfg.chain.steps:
        raise UserError("stage=chain needs chain.steps (see conf/experiment/rlhf_chain.yaml)")
    step_dirs = {name: run_dir / name for name in cfg.chain.steps}
    metrics = {}
    for name, step_overrides in cfg.chain.steps.items():
        overrides = [*inherited_overrides(step_stage(name, step_overrides)), *(resolve(o, step_dirs) for o in step_overrides)]
        step_cfg = compose_step(overrides)
        with open_dict(step_cfg):
            step_cfg.run_name = f"{cfg.run_name or 'chain'}/{name}"
        step_dir = step_dirs[name]
        if finished_with(step_dir, step_cfg):
            print(f"chain: {name} already finished in {step_dir} with this config; skipped", flush=True)
            step_metrics = json.loads((step_dir / "metrics.json").read_text())
        else:
            print(f"chain: {name} -> {step_dir}", flush=True)
            # As for a single run: never resume or replace a step run of another config unless resume=overwrite.
            with holding_run_dir(step_dir):
                prepare_run_dir(step_cfg, step_dir, overrides, write=is_main_process())
                step_metrics = run_stage(step_cfg, step_dir, overrides)
        metrics.update({f"{name}/{key}": value for key, value in step_metrics.items()})
    if is_main_process():  # the steps side by side: table, compare.csv, report.html (an aligner comparison's too)
        compare.main([str(run_dir)])
    return metrics


def step_stage(name: str, step_overrides) -> str:
    stages = [o.split("=", 1)[1] for o in step_overrides if o.startswith("stage=")]
    if len(stages) != 1:
        raise UserError(f"chain.steps.{name} must name exactly one stage=<name> override")
    return stages[0]


def inherited_overrides(stage: str) -> list:
    """The chain's command-line overrides that apply to a step of `stage`."""
    if not HydraConfig.initialized():
        return []
    other_stages = set(available_stages()) - {stage}
    kept = []
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        root = key.split(".", 1)[0].split("/", 1)[0]
        if root not in NOT_INHERITED and root not in other_stages:
            kept.append(override)
    return kept


def resolve(override: str, step_dirs: dict) -> str:
    """`key=@step` -> `key=<that step's run directory>`."""
    key, _, value = override.partition("=")
    if not value.startswith(STEP_REFERENCE):
        return override
    step = value[len(STEP_REFERENCE) :]
    if step not in step_dirs:
        raise UserError(f"chain override {override}: no step named '{step}'; steps: {', '.join(step_dirs)}")
    return f"{key}={step_dirs[step]}"


def compose_step(overrides: list):
    """The config `python train.py <overrides>` would run (a bad override fails in one line)."""
    return compose(overrides, hydra_node=False)
