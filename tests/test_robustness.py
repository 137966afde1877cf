"""Runs survive interruption and refuse to destroy work: kill -9 and resume gives the same
metrics, a finished run is never overwritten, divergence stops a run cleanly, and every run
says how it ended in status.json."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, cli, train

KILLABLE = ("sft.max_steps=40", "sft.save_steps=10", "sft.eval_steps=20", "sft.logging_steps=5")


def status(run_dir) -> dict:
    return json.loads((run_dir / "status.json").read_text())


@pytest.mark.slow
def test_killed_run_resumes_to_the_metrics_of_an_uninterrupted_one(tmp_path):
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *KILLABLE], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    mark = run_dir / "checkpoints" / "checkpoint-20" / "rlhf_checkpoint.json"
    deadline = time.time() + 240
    while not mark.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert mark.exists() and not (run_dir / "metrics.json").exists(), "the run must be killed mid-training"
    assert status(run_dir)["status"] == "running"  # what a killed run leaves behind

    done = cli(f"hydra.run.dir={run_dir}", *KILLABLE)  # the same command again
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout and "checkpoint-20" in done.stdout
    resumed = json.loads((run_dir / "metrics.json").read_text())
    uninterrupted = train(tmp_path / "whole", *KILLABLE)
    for key, value in uninterrupted.items():
        if "runtime" not in key and "per_second" not in key:
            assert resumed[key] == pytest.approx(value, abs=1e-6), key
    steps = [json.loads(line)["step"] for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # no step logged twice across the interruption
    assert status(run_dir)["status"] == "done"

    # A finished run is never overwritten, not even its saved config.
    saved = (run_dir / ".hydra" / "config.yaml").read_text()
    again = cli(f"hydra.run.dir={run_dir}", *KILLABLE, "sft.learning_rate=0.1")
    assert again.returncode == 2 and "holds a finished run" in again.stderr and "Traceback" not in again.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == saved


def refused(capsys, run_dir, *overrides) -> str:
    """The one-line error of a run that stops before training."""
    with pytest.raises(SystemExit) as stop:
        train(run_dir, *overrides)
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_overwrite_replaces_a_finished_run(tmp_path, capsys):
    train(tmp_path, "sft.max_steps=2", "dataset.test_size=0")
    assert "holds a finished run" in refused(capsys, tmp_path, "sft.max_steps=2", "dataset.test_size=0")
    metrics = train(tmp_path, "sft.max_steps=3", "dataset.test_size=0", "resume=overwrite")
    assert metrics["epoch"] > 0 and status(tmp_path)["status"] == "done"
    assert "max_steps: 3" in (tmp_path / ".hydra" / "config.yaml").read_text()


@pytest.mark.slow
def test_divergence_stops_with_the_step_and_marks_the_run_failed(tmp_path):
    done = cli(f"hydra.run.dir={tmp_path}", "sft.max_steps=30", "sft.learning_rate=1e12", "sft.logging_steps=1", "sft.save_steps=1")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    error = re.search(r"error: training diverged at step \d+: .*", done.stderr)  # progress bars share the stream
    assert error and "the last good checkpoint is" in error.group(0)
    record = status(tmp_path)
    assert record["status"] == "failed" and record["error"].startswith("training diverged")
    from rlhf.runs import last_complete_checkpoint

    kept = last_complete_checkpoint(tmp_path)
    assert kept is not None  # written before the weights went bad, and intact
    import torch
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(kept / "adapter_model.safetensors")).values())


def test_interrupted_run_of_another_config_is_not_resumed(tmp_path, capsys):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("stage: dpo\n")
    (tmp_path / "status.json").write_text('{"status": "running"}')
    (tmp_path / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-5" / "rlhf_checkpoint.json").write_text('{"step": 5}')
    assert "interrupted run of a different config" in refused(capsys, tmp_path, "sft.max_steps=2")


@pytest.mark.slow
def test_a_failing_sweep_job_does_not_stop_the_others(tmp_path):
    done = cli("stage=dpo", "dpo.beta=0.1,-1,0.3", "-m", f"hydra.sweep.dir={tmp_path}", "dpo.max_steps=2", "dataset.test_size=0")
    assert done.returncode != 0
    assert [status(tmp_path / job)["status"] for job in "012"] == ["done", "failed", "done"]
    assert status(tmp_path / "1")["error"] == "dpo.beta=-1: must be > 0"
    summary = done.stdout[done.stdout.index("sweep summary") :]
    assert "job 0 [stage=dpo,dpo.beta=0.1" in summary and "]: done" in summary
    assert "job 1 [stage=dpo,dpo.beta=-1,dpo.max_steps=2,dataset.test_size=0]: failed: dpo.beta=-1: must be > 0" in summary
    assert "1 of 3 jobs failed" in done.stderr


def test_wandb_run_keeps_its_id_across_a_resume(tmp_path, monkeypatch):
    """W&B (offline here) logs under the id kept in the run directory: a resumed run reuses it."""
    wandb = pytest.importorskip("wandb")
    summaries, finish = [], wandb.finish

    def finishing(*args, **kwargs):  # what the W&B run's summary holds as it is closed
        summaries.append({key: wandb.run.summary[key] for key in wandb.run.summary.keys()})
        return finish(*args, **kwargs)

    monkeypatch.setattr(wandb, "finish", finishing)
    overrides = ("logger=wandb", "sft.max_steps=2", "dataset.test_size=0")
    train(tmp_path, *overrides)
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    (tmp_path / "status.json").write_text('{"status": "running"}')  # as a killed run leaves it
    (tmp_path / "metrics.json").unlink()
    train(tmp_path, *overrides)  # the same command again: it resumes
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(run_id) for run in runs)
    # the run's owner (rlhf.command) closes the W&B run once per run, with every final metric, its own included
    final = json.loads((tmp_path / "metrics.json").read_text())
    assert len(summaries) == 2 and summaries[-1]["stage_runtime"] == final["stage_runtime"]
    assert summaries[-1]["train_loss"] == pytest.approx(final["train_loss"])


def test_a_full_disk_while_saving_stops_with_one_line_and_the_earlier_checkpoint_resumes(tmp_path, monkeypatch, capsys):
    import torch

    overrides = ("sft.max_steps=6", "sft.save_steps=2", "dataset.test_size=0")
    real_save = torch.save

    def filling_up(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path):  # the disk fills while the second checkpoint is written (as safetensors words it)
            raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
        return real_save(obj, path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", filling_up)
        with pytest.raises(SystemExit) as stop:
            train(tmp_path, *overrides)
    assert stop.value.code == 2
    error = re.search(r"error: no space left on the device while writing .*", capsys.readouterr().err)  # progress bars share the stream
    assert error and error.group(0).endswith("it resumes from checkpoint-2")
    from rlhf.runs import last_complete_checkpoint

    assert status(tmp_path)["status"] == "failed" and last_complete_checkpoint(tmp_path).name == "checkpoint-2"  # 4 never counted
    train(tmp_path, *overrides)
    assert "resuming from" in capsys.readouterr().out and status(tmp_path)["status"] == "done"
