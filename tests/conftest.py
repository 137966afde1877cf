"""Shared test set-up: one tiny-model cache per test session, Hydra's compose API, and a
helper that trains a stage in-process (many tiny trainings in one process: imports cost
seconds, training the tiny model does not)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

import rlhf  # noqa: F401  (registers the ${project_root:} resolver the config uses)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Build the tiny model into a fresh cache (subprocesses inherit it) and never reach a hub."""
    os.environ.setdefault("RLHF_CACHE", str(tmp_path_factory.mktemp("rlhf-cache")))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["WANDB_MODE"] = "offline"
    os.environ.pop("WANDB_API_KEY", None)
    yield


def compose_config(*overrides: str):
    """The config `python train.py <overrides>` would run, with Hydra's own node set so that
    `${hydra:...}` interpolations resolve."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def reward_model_as_ppo_loads_it(rm_run, *overrides: str):
    """The frozen reward model a PPO run of `overrides` loads from the finished RM run `rm_run`,
    through the run context as `python train.py stage=ppo ppo.reward_model=<rm_run>` opens it."""
    from rlhf.context import RunContext
    from rlhf.reward_model import load_reward_model

    context = RunContext.open(compose_config("stage=ppo", f"ppo.reward_model={rm_run}", *overrides), rm_run)
    return load_reward_model(context.runs["ppo.reward_model"], context)


# One PPO update of 8 short answers, scored before and after on 4 held-out prompts: the smallest PPO run.
ONE_SMALL_PPO_UPDATE = (
    "ppo.total_updates=1",
    "ppo.batch_size=8",
    "ppo.mini_batch_size=8",
    "ppo.ppo_epochs=1",
    "ppo.max_new_tokens=8",
    "ppo.eval_prompts=4",
)


def fresh_cache(tmp_path: Path) -> Path:
    """A cache that holds the tiny model and no registered run."""
    from rlhf.tiny_model import ensure_tiny_model

    cache = tmp_path / "cache"
    shutil.copytree(ensure_tiny_model(), cache / ensure_tiny_model().name)
    return cache


def train(run_dir: Path, *overrides: str) -> dict:
    """Run a stage in this process into `run_dir`; return its metrics.json. It trains, even when
    another test trained the same config (`reuse=false`), unless the overrides set `reuse`."""
    from rlhf.command import main

    if not any(override.startswith("reuse=") for override in overrides):
        overrides = ("reuse=false", *overrides)
    main(compose_config(*overrides), run_dir=run_dir)
    return json.loads((run_dir / "metrics.json").read_text())


def history(run_dir: Path, key: str) -> list:
    """The values of `key` over the training log lines of history.jsonl, in order."""
    lines = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return [line[key] for line in lines if key in line]


def crash_in_call(monkeypatch, owner, method: str, call: int) -> None:
    """Make `owner.method` raise RuntimeError("simulated crash") in its `call`-th call from now:
    a run that dies mid-training (monkeypatch puts the method back)."""
    original, calls = getattr(owner, method), []

    def crashing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, crashing)


def train_through_a_crash(monkeypatch, owner, method: str, call: int, run_dir: Path, *overrides: str) -> dict:
    """Run a stage that dies in the `call`-th call of `owner.method`, then the same command again
    (which resumes); return the second run's metrics.json."""
    with monkeypatch.context() as patch:
        crash_in_call(patch, owner, method, call)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(run_dir, *overrides)
    return train(run_dir, *overrides)


def assert_same_metrics(got: dict, expected: dict, tolerance: float) -> None:
    """Every metric of `expected` but timings is in `got`, equal within `tolerance`."""
    for key, value in expected.items():
        # timings differ, and so do the reference log-prob cache's counts (what an earlier run left)
        if "runtime" not in key and "per_second" not in key and not key.startswith(("time/", "ref_logps_")):
            assert got[key] == pytest.approx(value, abs=tolerance), key


def cli(*args: str, python_flags: tuple = (), timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python train.py <args>` from the project root, as a user would."""
    return subprocess.run([sys.executable, *python_flags, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def rlhf_chain(tmp_path_factory):
    """SFT -> RM -> PPO through `experiment=rlhf_chain`, shortened, once per test session."""
    run_dir = tmp_path_factory.mktemp("rlhf_chain")
    metrics = train(run_dir, "experiment=rlhf_chain", "sft.max_steps=60", "rm.max_steps=60", "ppo.total_updates=30")
    return run_dir, metrics
