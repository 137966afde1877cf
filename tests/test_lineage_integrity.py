"""A trained model stays what it was trained on: a retrained upstream run stops every later use
with one line; merged copies and built models that are gone or damaged are rebuilt; one process
builds a merged copy while the others wait; in bfloat16 the earlier runs' updates are not
rounded away (the model computes as peft computed it while those runs trained)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config, reward_model_as_ppo_loads_it, train
from peft import PeftModel

from rlhf.cache import cache_dir
from rlhf.export import export
from rlhf.lineage import Lineage
from rlhf.models import load_model


def train_sft_then_dpo(work: Path) -> Path:
    train(work / "sft", "stage=sft", "sft.max_steps=4", "dataset.test_size=0")
    train(work / "dpo", "stage=dpo", "dpo.max_steps=2", "dataset.test_size=0", f"model.init_from={work / 'sft'}")
    return work


@pytest.fixture(scope="module")
def sft_then_dpo(tmp_path_factory):
    return train_sft_then_dpo(tmp_path_factory.mktemp("lineage"))


def one_line_error(capsys, call) -> str:
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    # Progress bars from loading the models may precede it; the error itself is one line, alone.
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.slow
def test_a_retrained_upstream_run_stops_export_eval_and_init_from(rlhf_chain, tmp_path, capsys):
    from rlhf.export import main as export_main

    work, (chain, _) = train_sft_then_dpo(tmp_path / "lineage"), rlhf_chain  # its own: the test retrains the SFT run
    dpo = work / "dpo"
    uses = {
        "export": lambda n: export_main([str(dpo), str(tmp_path / f"export{n}")]),
        "eval": lambda n: train(
            tmp_path / f"eval{n}",
            "stage=eval",
            f"eval.policy={dpo}",
            f"eval.reward_model={chain / 'rm'}",
            "eval.num_prompts=2",
            "eval.max_new_tokens=4",
        ),
        "init_from": lambda n: train(
            tmp_path / f"next{n}", "stage=dpo", "dpo.max_steps=1", "dataset.test_size=0", f"model.init_from={dpo}"
        ),
    }
    for use in uses.values():  # the lineage as trained: every use works
        use(0)
    train(work / "sft", "stage=sft", "sft.max_steps=4", "dataset.test_size=0", "sft.learning_rate=3e-3", "resume=overwrite")
    for name, use in uses.items():
        err = one_line_error(capsys, lambda use=use: use(1))
        assert str(work / "sft") in err and "retrain" in err, (name, err)
    assert not (tmp_path / "export1").exists()


def test_a_deleted_merged_copy_is_rebuilt_by_export(sft_then_dpo, tmp_path, capsys):
    dpo = sft_then_dpo / "dpo"
    merged = Path(json.loads((dpo / "final" / "lineage.json").read_text())["trained_on"]["merged_weights"])
    assert merged.parent == cache_dir() and (merged / "config.json").is_file()
    shutil.rmtree(merged)
    record = export(dpo, tmp_path / "out")
    assert record["max_difference_relative_to_1_plus_largest_abs_logit"] <= 1e-5
    assert (merged / "config.json").is_file() and f"cache: built {merged}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_damaged_tiny_model_is_rebuilt_and_the_run_finishes(tmp_path):
    from rlhf.tiny_model import ensure_tiny_model

    cache = tmp_path / "cache"
    tiny = ensure_tiny_model()
    shutil.copytree(tiny, cache / tiny.name)
    weights = cache / tiny.name / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    env = {**os.environ, "RLHF_CACHE": str(cache)}
    done = subprocess.run(
        [sys.executable, "train.py", f"hydra.run.dir={tmp_path / 'run'}", "sft.max_steps=2", "dataset.test_size=0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"cache: rebuilding {cache / tiny.name} (model.safetensors has 100 bytes" in done.stderr
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "done"
    assert weights.read_bytes() == (tiny / "model.safetensors").read_bytes()  # the build is deterministic


@pytest.mark.slow
def test_parallel_sweep_jobs_build_one_merged_copy(sft_then_dpo, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the [cluster] extra is not installed")
    from rlhf.tiny_model import ensure_tiny_model

    cache = tmp_path / "cache"  # holds the tiny model and no merged copy
    shutil.copytree(ensure_tiny_model(), cache / ensure_tiny_model().name)
    done = subprocess.run(
        [
            sys.executable,
            "train.py",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "stage=dpo",
            f"model.init_from={sft_then_dpo / 'sft'}",
            "dpo.beta=0.1,0.3",
            "dpo.max_steps=1",
            "dataset.test_size=0",
            "-m",
        ],
        cwd=ROOT,
        env={**os.environ, "RLHF_CACHE": str(cache)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for job in ("0", "1"):
        assert json.loads((tmp_path / "sweep" / job / "status.json").read_text())["status"] == "done"
    output = done.stdout + done.stderr
    assert output.count("cache: built") == 1 and "merged-" in output, output[-3000:]
    assert len(list(cache.glob("merged-*/config.json"))) == 1 and not list(cache.glob(".building-*"))


def test_a_directory_in_the_way_of_a_build_is_replaced(tmp_path, monkeypatch, capsys):
    from rlhf.cache import build_once

    target = tmp_path / "entry"
    target.mkdir()
    (target / "partial.bin").write_bytes(b"x")  # a build that died before finishing, or stray files

    def build(out):
        (out / "config.json").write_text("{}")

    assert build_once(target, build) == target
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "rlhf_manifest.json"]
    assert "no manifest" in capsys.readouterr().err
    (target / "config.json").write_text("[]")  # same size, rewritten: the digest tells
    build_once(target, build)
    assert (target / "config.json").read_text() == "{}" and "config.json changed since it was built" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bf16_sft(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("bf16") / "sft"
    train(run_dir, "stage=sft", "hardware.dtype=bfloat16", "sft.max_steps=5", "dataset.test_size=0")
    return run_dir


def as_trained_by_peft(run_dir: Path, hardware, head="causal_lm", pad_token_id=None):
    """The run's model (trained on the tiny base) as its training computed it: the base in the
    run's dtype with the run's adapter on top, unmerged (peft)."""
    lineage = Lineage(compose_config().model)
    base = load_model(lineage.base_path(), lineage.base, None, hardware, head=head, pad_token_id=pad_token_id)
    return PeftModel.from_pretrained(base, str(run_dir / "final")).eval(), lineage


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["Hello there, how are you?", "1+1="], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def test_in_bfloat16_a_run_starts_from_the_model_its_upstream_trained(bf16_sft):
    """DPO/PPO start from the SFT policy: in bfloat16 that is the bfloat16 base with the SFT
    adapter beside it, not the adapter rounded into bfloat16 weights."""
    hardware = compose_config("hardware.dtype=bfloat16").hardware
    expected, base = as_trained_by_peft(bf16_sft, hardware)
    tokenizer = base.tokenizer()
    lineage = Lineage.of(compose_config(f"model.init_from={bf16_sft}").model)
    start = lineage.load(hardware).eval()
    rounded = load_model(lineage.path(), lineage.base, None, hardware).eval()  # the float32 merged copy in bfloat16
    assert (logits(start, tokenizer) - logits(expected, tokenizer)).abs().max() == 0
    assert (logits(rounded, tokenizer) - logits(expected, tokenizer)).abs().max() > 1e-2  # what merging in bfloat16 gave


def test_in_bfloat16_ppo_and_eval_score_with_the_reward_model_that_was_measured(tmp_path):
    """The RM that PPO and eval load scores every held-out pair as the RM did when its
    accuracy was measured (its adapter unmerged over the bfloat16 base), pair by pair."""
    from rlhf.data import load_splits

    run_dir = tmp_path / "rm"
    train(run_dir, "stage=rm", "hardware.dtype=bfloat16", "rm.max_steps=10", "rm.learning_rate=1e-3")
    cfg = compose_config("stage=ppo", "hardware.dtype=bfloat16", f"ppo.reward_model={run_dir}")
    reward = reward_model_as_ppo_loads_it(run_dir, "hardware.dtype=bfloat16")
    loaded, tokenizer = reward.model, reward.tokenizer
    expected, _ = as_trained_by_peft(run_dir, cfg.hardware, head="reward", pad_token_id=tokenizer.pad_token_id)
    pairs = load_splits(cfg.dataset, kind="preference").eval
    texts = [
        tokenizer.apply_chat_template([*row["prompt"], *row[side]], tokenize=False) for row in pairs for side in ("chosen", "rejected")
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        got, want = loaded(**batch).logits.float(), expected(**batch).logits.float()
    assert torch.equal(got, want)
    folded = expected.merge_and_unload()  # what PPO and eval scored with before: the adapter rounded into bfloat16 weights
    with torch.no_grad():
        assert not torch.equal(folded(**batch).logits.float(), want)


def test_a_lineage_resolves_its_base_model_once(monkeypatch, tmp_path):
    """Where the base lives (a hub snapshot lookup, a built-in model's cache check) is asked once
    per lineage, however often loading, recording and identity read it."""
    import rlhf.lineage

    calls = []
    resolve = rlhf.lineage.resolve_model_path
    monkeypatch.setattr(rlhf.lineage, "resolve_model_path", lambda model_cfg: calls.append(1) or resolve(model_cfg))
    lineage = Lineage.of(compose_config("stage=dpo").model)
    lineage.tokenizer()
    lineage.identity("float32", None)
    lineage.record("float32", stacked=False)
    stacked = lineage.merged(tmp_path / "adapter")  # the lineage one adapter up stands on the same base
    assert stacked.base_path() == lineage.path() and len(calls) == 1


def test_a_lineage_identity_is_its_weights_not_their_place(tmp_path):
    """The same weights in another directory (another cache, another machine's paths) are the same
    lineage: an interrupted PPO run resumes there. Other weights are another lineage."""
    lineage = Lineage.of(compose_config("stage=dpo").model)
    moved = tmp_path / "moved"
    shutil.copytree(lineage.base_path(), moved)
    identity = lineage.identity("float32", None)
    assert Lineage.of(compose_config("stage=dpo", f"model.name_or_path={moved}").model).identity("float32", None) == identity
    weights = moved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert Lineage.of(compose_config("stage=dpo", f"model.name_or_path={moved}").model).identity("float32", None) != identity
