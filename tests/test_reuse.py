"""A run identical to one that finished - same config, same upstream weights and data by content,
same code - is reused instead of trained again (rlhf/reuse.py): across the jobs of a sweep, run
one after another or at once, and across plain runs; anything that changes the result trains."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ONE_SMALL_PPO_UPDATE, ROOT, compose_config, crash_in_call, fresh_cache, train
from omegaconf import OmegaConf

from rlhf import compare
from rlhf.data import BUILTIN_DIR

TINY = ("sft.max_steps=2", "dataset.test_size=0.2")


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def trained_here(run_dir: Path) -> bool:
    return status(run_dir)["status"] == "done" and "reused_from" not in status(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]], ids=["in-turn", "two-at-once"])
def test_a_kl_coef_sweep_trains_sft_and_the_reward_model_once(tmp_path, launcher):
    if launcher:
        pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the [cluster] extra is not installed")
    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [
            sys.executable,
            "train.py",
            "experiment=rlhf_chain",
            "ppo.kl_coef=0.05,0.1,0.2",
            *launcher,
            f"hydra.sweep.dir={sweep}",
            "sft.max_steps=2",
            "rm.max_steps=2",
            *ONE_SMALL_PPO_UPDATE,
            "-m",
        ],
        cwd=ROOT,
        env={**os.environ, "RLHF_CACHE": str(fresh_cache(tmp_path))},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = [sweep / job for job in ("0", "1", "2")]
    for step in ("sft", "rm"):
        trainers = [job / step for job in jobs if trained_here(job / step)]
        assert len(trainers) == 1, [status(job / step) for job in jobs]  # the others waited for it (or came after) and reused it
        for job in jobs:
            if job / step != trainers[0]:
                assert status(job / step)["reused_from"] == str(trainers[0].resolve())
                assert (job / step / "final" / "adapter_model.safetensors").is_file()
    assert all(trained_here(job / "ppo") for job in jobs)
    kl_coefs = [yaml.safe_load((job / "ppo" / ".hydra" / "config.yaml").read_text())["ppo"]["kl_coef"] for job in jobs]
    assert sorted(kl_coefs) == [0.05, 0.1, 0.2]
    # Comparing the sweep shows the shared SFT and reward model once, and every PPO run.
    assert compare.main([str(sweep)]) == 0
    rows = (sweep / "compare.csv").read_text().splitlines()[1:]
    assert sorted(row.split(",", 1)[0].split("/")[1] for row in rows) == ["ppo", "ppo", "ppo", "rm", "sft"]


def test_an_identical_run_is_reused_and_loads_like_the_one_that_trained(tmp_path):
    from peft import AutoPeftModelForCausalLM

    first = train(tmp_path / "a", "reuse=true", *TINY)
    again = train(tmp_path / "b", "reuse=true", *TINY)
    assert trained_here(tmp_path / "a")
    assert status(tmp_path / "b")["reused_from"] == str((tmp_path / "a").resolve())
    assert again == first
    # The copy is a run of its own: plain peft loads it to the model that trained.
    ids = torch.tensor([[5, 6, 7, 8]])
    logits = [AutoPeftModelForCausalLM.from_pretrained(tmp_path / run / "final")(ids).logits for run in ("a", "b")]
    assert torch.equal(logits[0], logits[1])
    # Deleting the run that trained leaves the copy whole (its files are copies, not references).
    shutil.rmtree(tmp_path / "a")
    assert torch.equal(AutoPeftModelForCausalLM.from_pretrained(tmp_path / "b" / "final")(ids).logits, logits[0])
    # ... and the next identical run finds nothing registered to reuse: it trains.
    train(tmp_path / "c", "reuse=true", *TINY)
    assert trained_here(tmp_path / "c")


@pytest.mark.slow
def test_a_changed_seed_data_file_or_upstream_trains_anew(tmp_path):
    train(tmp_path / "sft", "reuse=true", *TINY)
    train(tmp_path / "seed", "reuse=true", "seed=43", *TINY)
    assert trained_here(tmp_path / "seed")
    train(tmp_path / "no-reuse", "reuse=false", *TINY)
    assert trained_here(tmp_path / "no-reuse")

    # The same data at another path is the same data; one row less is other data.
    data = tmp_path / "sft_zh.jsonl"
    shutil.copy(BUILTIN_DIR / "sft_zh.jsonl", data)
    train(tmp_path / "moved", "reuse=true", f"dataset.path={data}", *TINY)
    assert status(tmp_path / "moved")["reused_from"] == str((tmp_path / "no-reuse").resolve())  # the latest to train it
    data.write_text("".join(data.read_text().splitlines(keepends=True)[1:]))
    train(tmp_path / "edited", "reuse=true", f"dataset.path={data}", *TINY)
    assert trained_here(tmp_path / "edited")

    # A reward model reads its upstream by content: a copy of the SFT run is the same start, another seed's SFT is not.
    rm = ("stage=rm", "rm.max_steps=2", "dataset.test_size=0.2", "reuse=true")
    train(tmp_path / "rm", *rm, f"model.init_from={tmp_path / 'sft'}")
    train(tmp_path / "rm-moved", *rm, f"model.init_from={tmp_path / 'moved'}")
    assert status(tmp_path / "rm-moved")["reused_from"] == str((tmp_path / "rm").resolve())
    train(tmp_path / "rm-seed", *rm, f"model.init_from={tmp_path / 'seed'}")
    assert trained_here(tmp_path / "rm-seed")


def test_a_failed_run_is_not_reused_and_does_not_block_the_next(tmp_path, monkeypatch):
    from transformers import Trainer

    with monkeypatch.context() as patch:
        crash_in_call(patch, Trainer, "training_step", 2)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(tmp_path / "crashed", "reuse=true", "seed=7", *TINY)
    assert status(tmp_path / "crashed")["status"] == "failed"
    train(tmp_path / "next", "reuse=true", "seed=7", *TINY)
    assert trained_here(tmp_path / "next")


def test_a_lock_left_by_a_killed_job_does_not_block(tmp_path):
    """A job killed while it trained leaves its lock file; the kernel released the lock itself."""
    from rlhf.cache import cache_dir
    from rlhf.reuse import step_key

    key = step_key(compose_config("seed=8", *TINY))
    lock = cache_dir() / "steps" / f"{key}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    hold = f"import fcntl,time; f=open({str(lock)!r},'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    start = time.perf_counter()
    train(tmp_path / "after", "reuse=true", "seed=8", *TINY)
    assert trained_here(tmp_path / "after") and lock.is_file() and time.perf_counter() - start < 120


def test_reuse_copies_share_no_file_and_are_checked_against_what_their_run_finished_with(tmp_path, capsys):
    """A reused run's weights were hard links to the registered run's: a write into one run's
    final/ changed the other's, and a file damaged in place was reused again by the next run."""
    runs = {name: tmp_path / name for name in ("a", "b", "c")}
    train(runs["a"], "reuse=true", "seed=9", *TINY)
    train(runs["b"], "reuse=true", "seed=9", *TINY)
    assert status(runs["b"])["reused_from"] == str(runs["a"].resolve())
    weights = {name: run / "final" / "adapter_model.safetensors" for name, run in runs.items()}
    assert not os.path.samefile(weights["a"], weights["b"])
    original = weights["a"].read_bytes()

    def damage(path: Path) -> None:  # a byte range rewritten in place, as a stray write or a bad disk would
        with open(path, "r+b") as f:
            f.seek(len(original) // 2)
            f.write(bytes(64))

    damage(weights["b"])
    assert weights["a"].read_bytes() == original  # the reused copy is a file of its own
    damage(weights["a"])  # the registered run itself
    capsys.readouterr()
    train(runs["c"], "reuse=true", "seed=9", *TINY)
    expected = f"reuse: {runs['a'].resolve()} does not hold what it finished with (final/adapter_model.safetensors changed): training anew"
    assert expected in capsys.readouterr().out
    assert trained_here(runs["c"]) and weights["c"].read_bytes() == original  # trained again: the same weights as a's were


@pytest.mark.slow
def test_reuse_identity_covers_processes_tokenizer_and_config_files_and_the_reward_models_max_length(tmp_path, monkeypatch):
    """A Trainer's global batch grows with the processes; a chat template, a tokenizer or a config
    changes what a model reads and computes; PPO, GRPO, RLOO and eval cut rows to their reward
    model's max_length. None of these was in the identity, so a run differing in one was reused."""
    from rlhf.reuse import step_key
    from rlhf.tiny_model import ensure_tiny_model

    base = tmp_path / "base"
    shutil.copytree(ensure_tiny_model(), base)
    custom = ("model=custom", f"model.name_or_path={base}", *TINY)
    key = step_key(compose_config(*custom))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert step_key(compose_config(*custom)) != key
    monkeypatch.delenv("WORLD_SIZE")
    assert step_key(compose_config(*custom)) == key
    template = base / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    assert step_key(compose_config(*custom)) != key

    train(tmp_path / "sft", *TINY)
    train(tmp_path / "rm", "stage=rm", "rm.max_steps=2", "dataset.test_size=0.2", "rm.max_length=256")
    for run in ("sft", "rm"):
        shutil.copytree(tmp_path / run, tmp_path / f"{run}-copy")
    evaluation = ("stage=eval", f"eval.policy={tmp_path / 'sft'}", "eval.num_prompts=4")
    key = step_key(compose_config(*evaluation, f"eval.reward_model={tmp_path / 'rm'}"))
    assert step_key(compose_config(*evaluation, f"eval.reward_model={tmp_path / 'rm-copy'}")) == key  # the same run elsewhere
    saved = tmp_path / "rm-copy" / ".hydra" / "config.yaml"
    saved.write_text(saved.read_text().replace("max_length: 256", "max_length: 128"))  # the same weights, cut shorter
    assert step_key(compose_config(*evaluation, f"eval.reward_model={tmp_path / 'rm-copy'}")) != key

    key = step_key(compose_config("stage=dpo", f"model.init_from={tmp_path / 'sft'}"))
    assert step_key(compose_config("stage=dpo", f"model.init_from={tmp_path / 'sft-copy'}")) == key
    tokenizer_config = tmp_path / "sft-copy" / "final" / "tokenizer_config.json"
    tokenizer_config.write_text(tokenizer_config.read_text().replace('"model_max_length": 512', '"model_max_length": 256'))
    assert step_key(compose_config("stage=dpo", f"model.init_from={tmp_path / 'sft-copy'}")) != key


@pytest.mark.parametrize("stage", ["dpo", "ppo", "eval"])
def test_a_run_saved_before_its_settings_class_moved_is_finished_with_todays_config(tmp_path, stage):
    """A sweep or chain re-run after a settings class moved (rlhf.registry.RENAMED_TARGETS) skips
    what finished: the saved `_target_` under its old name is the same config."""
    from rlhf.registry import RENAMED_TARGETS
    from rlhf.runs import finished_with, save_yaml, write_status

    cfg = compose_config(f"stage={stage}")
    job = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    [old] = [old for old, new in RENAMED_TARGETS.items() if new == cfg[stage]["_target_"]]
    (tmp_path / ".hydra").mkdir()
    saved = OmegaConf.to_container(job)
    saved[stage]["_target_"] = old
    save_yaml(OmegaConf.create(saved), tmp_path / ".hydra" / "config.yaml")
    write_status(tmp_path, "done")
    assert finished_with(tmp_path, cfg)
    saved[stage]["_target_"] = "rlhf.somewhere.Else"  # any other class is another config
    save_yaml(OmegaConf.create(saved), tmp_path / ".hydra" / "config.yaml")
    assert not finished_with(tmp_path, cfg)
