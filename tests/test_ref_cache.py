"""The reference log-prob cache: computed once per (reference, tokenizer, rows, truncation),
reused by later runs with identical results, recomputed when any part of the key changes."""

import pytest
from conftest import fresh_cache, history, train


def cached_files():
    from rlhf.cache import cache_dir

    return sorted((cache_dir() / "ref_logps").glob("*.safetensors"))


@pytest.mark.slow
def test_cached_and_uncached_runs_train_identically(tmp_path, capsys):
    short = ("stage=dpo", "dpo.max_steps=4", "dpo.logging_steps=1", "dataset.max_samples=80", "dpo.max_length=200")
    before = set(cached_files())
    first = train(tmp_path / "first", *short, "dpo.beta=0.1")
    written = set(cached_files()) - before
    assert len(written) == 2  # the train and the eval split
    capsys.readouterr()

    second = train(tmp_path / "second", *short, "dpo.beta=0.3")  # another job of a beta sweep
    assert capsys.readouterr().out.count("loaded from") == 1  # the eval split; the train split's rows below
    assert 0 < first["ref_logps_rows"] < 72 and second["ref_logps_cached_rows"] == first["ref_logps_rows"]  # 4 steps reach fewer rows
    assert second["ref_logps_rows"] == 0  # the same 4 steps reach the same rows: nothing computed
    assert set(cached_files()) - before == written  # nothing recomputed

    again = train(tmp_path / "again", *short, "dpo.beta=0.1")
    assert history(tmp_path / "again", "loss") == pytest.approx(history(tmp_path / "first", "loss"), abs=1e-6)
    assert again["eval_loss"] == pytest.approx(first["eval_loss"], abs=1e-6)
    assert second["train_loss"] != first["train_loss"]  # beta changed the loss, not the reference

    uncached = train(tmp_path / "uncached", *short, "dpo.beta=0.1", "dpo.ref_cache=false")
    assert history(tmp_path / "uncached", "loss") == pytest.approx(history(tmp_path / "first", "loss"), abs=1e-5)
    assert uncached["eval_rewards/margins"] == pytest.approx(first["eval_rewards/margins"], abs=1e-4)


def test_a_change_in_the_key_recomputes(tmp_path):
    short = ("stage=dpo", "dpo.max_steps=1", "dataset.max_samples=40", "dataset.test_size=0")
    train(tmp_path / "a", *short, "dpo.max_length=128")
    count = len(cached_files())
    train(tmp_path / "b", *short, "dpo.max_length=96")  # truncation differs
    assert len(cached_files()) == count + 1
    train(tmp_path / "c", *short, "dpo.max_length=96", "dataset.max_samples=30")  # the rows differ
    assert len(cached_files()) == count + 2
    train(tmp_path / "sft", "sft.max_steps=1", "dataset.test_size=0")
    train(tmp_path / "d", *short, "dpo.max_length=96", "dataset.max_samples=30", f"model.init_from={tmp_path / 'sft'}")
    assert len(cached_files()) == count + 3  # the reference differs: the SFT policy, not the base model


def test_a_damaged_cache_file_is_reported_recomputed_and_replaced(tmp_path, capsys):
    short = ("stage=dpo", "dpo.max_steps=1", "dataset.max_samples=24", "dataset.test_size=0", "dpo.max_length=100")
    before = set(cached_files())
    train(tmp_path / "a", *short)
    [written] = set(cached_files()) - before
    whole = written.read_bytes()
    written.write_bytes(whole[:100])  # a copy cut short (a full disk, an interrupted transfer)
    capsys.readouterr()
    train(tmp_path / "b", *short)
    lines = [line for line in capsys.readouterr().out.splitlines() if str(written) in line]
    assert len(lines) == 1 and "unreadable" in lines[0] and "computing them anew" in lines[0]
    assert written.read_bytes() == whole  # rewritten whole
    assert not list(written.parent.glob(f".{written.name}.*"))  # no temporary file left behind


def test_a_short_run_computes_only_the_rows_it_reaches_and_a_longer_one_adds_to_them(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE", str(fresh_cache(tmp_path)))  # no reference rows from earlier tests of the same data
    short = (
        "stage=dpo",
        "dataset.max_samples=2000",
        "dpo.per_device_train_batch_size=4",
        "dpo.gradient_accumulation_steps=1",
        "dpo.logging_steps=1",
        "dataset.test_size=0",
    )
    two = train(tmp_path / "two", *short, "dpo.max_steps=2")
    assert two["ref_logps_rows"] <= 16 and two["ref_logps_cached_rows"] == 0  # 2 steps of 4 pairs, not the whole split
    three = train(tmp_path / "three", *short, "dpo.max_steps=3")
    assert three["ref_logps_cached_rows"] == two["ref_logps_rows"] and three["ref_logps_rows"] == 4  # the third step's rows only
    # The values filled in as training went are the reference's: the same losses as computing the reference every step.
    train(tmp_path / "uncached", *short, "dpo.max_steps=3", "dpo.ref_cache=false")
    assert history(tmp_path / "three", "loss") == pytest.approx(history(tmp_path / "uncached", "loss"), abs=1e-5)
