"""Preemption (rlhf/preemption.py): SIGTERM or SIGUSR1 ends a run after the step in progress with a
complete checkpoint at that step, status.json `preempted`, exit code 75; the same command resumes
from that checkpoint to the metrics of an uninterrupted run; a second signal ends it at once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, assert_same_metrics, crash_in_call, train

from rlhf.preemption import EXIT_CODE, INTERRUPT_EXIT_CODE
from rlhf.runs import last_complete_checkpoint


def signal_in_call(monkeypatch, owner, method: str, call: int, number=signal.SIGTERM) -> None:
    """Send this process `number` from inside the `call`-th call of `owner.method`: a scheduler's
    signal arriving in the middle of a step."""
    original, calls = getattr(owner, method), []

    def signalling(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), number)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, signalling)


def preempted(run_dir: Path, monkeypatch, owner, method: str, call: int, *overrides: str, number=signal.SIGTERM) -> dict:
    with monkeypatch.context() as patch:
        signal_in_call(patch, owner, method, call, number)
        with pytest.raises(SystemExit) as stop:
            train(run_dir, *overrides)
    assert stop.value.code == EXIT_CODE
    return json.loads((run_dir / "status.json").read_text())


def test_a_signalled_dpo_run_checkpoints_the_step_it_was_in_and_resumes_to_the_uninterrupted_metrics(tmp_path, monkeypatch, capsys):
    from trl import DPOTrainer

    overrides = ("stage=dpo", "dpo.max_steps=8", "dpo.save_steps=1000", "dpo.logging_steps=1", "dataset.max_samples=120")
    overrides += ("dpo.per_device_train_batch_size=2", "dpo.gradient_accumulation_steps=4")
    whole = train(tmp_path / "whole", *overrides)
    handed = []  # what submitit's handler (installed before the run: it requeues the job) saw, and when

    def launcher(number, frame):
        handed.append((number, last_complete_checkpoint(tmp_path / "cut")))

    before = signal.signal(signal.SIGUSR2, launcher)
    try:  # SIGUSR2: submitit's signal ahead of the time limit
        status = preempted(tmp_path / "cut", monkeypatch, DPOTrainer, "training_step", 3 * 4 + 2, *overrides, number=signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, before)
    # the signal came in the 14th micro-batch (4 per step): step 4 was in progress and completes
    assert status["status"] == "preempted" and status["step"] == 4
    assert last_complete_checkpoint(tmp_path / "cut").name == "checkpoint-4"  # save_steps=1000 would have saved none
    assert handed == [(signal.SIGUSR2, tmp_path / "cut" / "checkpoints" / "checkpoint-4")]  # once, after the checkpoint
    assert not (tmp_path / "cut" / "metrics.json").exists() and not (tmp_path / "cut" / "final").exists()
    capsys.readouterr()
    resumed = train(tmp_path / "cut", *overrides)
    assert "resuming from" in capsys.readouterr().out
    assert_same_metrics(resumed, whole, 1e-5)


def test_a_signalled_ppo_run_stops_after_its_update_and_resumes_to_the_uninterrupted_metrics(rlhf_chain, tmp_path, monkeypatch):
    from rlhf.ppo.trainer import PPOTrainer

    chain_dir, _ = rlhf_chain
    overrides = (
        "stage=ppo",
        f"model.init_from={chain_dir / 'sft'}",
        f"ppo.reward_model={chain_dir / 'rm'}",
        "ppo.total_updates=4",
        "ppo.save_steps=0",  # no checkpoint but the preemption's
        "ppo.batch_size=8",
        "ppo.mini_batch_size=8",
        "ppo.ppo_epochs=1",
        "ppo.eval_prompts=8",
    )
    whole = train(tmp_path / "whole", *overrides)
    status = preempted(tmp_path / "cut", monkeypatch, PPOTrainer, "optimise", 2, *overrides)
    assert status["status"] == "preempted" and status["step"] == 2
    assert last_complete_checkpoint(tmp_path / "cut").name == "checkpoint-2"
    assert_same_metrics(train(tmp_path / "cut", *overrides), whole, 1e-5)


@pytest.mark.slow
def test_a_signalled_chain_resumes_at_the_step_that_was_preempted(tmp_path, monkeypatch, capsys):
    from rlhf.ppo.trainer import PPOTrainer

    overrides = ("experiment=rlhf_chain", "sft.max_steps=4", "rm.max_steps=4", "ppo.total_updates=3", "ppo.eval_prompts=8")
    status = preempted(tmp_path, monkeypatch, PPOTrainer, "optimise", 1, *overrides)
    assert status["status"] == "preempted"
    assert [json.loads((tmp_path / step / "status.json").read_text())["status"] for step in ("sft", "rm", "ppo")] == [
        "done",
        "done",
        "preempted",
    ]
    capsys.readouterr()
    train(tmp_path, *overrides)
    out = capsys.readouterr().out
    assert out.count("with this config; skipped") == 2 and "resuming from" in out and "checkpoint-1" in out
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "done"


LONG_DPO = ["train.py", "stage=dpo", "dpo.save_steps=1000", "dpo.logging_steps=1", "reuse=false", "dataset.test_size=0"]
LONG_DPO += ["dpo.per_device_train_batch_size=1", "dpo.gradient_accumulation_steps=1"]


def start_at_step(run_dir: Path, step: int, max_steps: int) -> subprocess.Popen:
    """`python train.py` (a tiny DPO run of `max_steps` steps of one pair) in its own process,
    returned once it has logged `step`."""
    command = [sys.executable, *LONG_DPO, f"dpo.max_steps={max_steps}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and not logged_step(run_dir / "history.jsonl", step):
        time.sleep(0.5)
    return process


@pytest.mark.parametrize(
    "number, code, status",
    [(signal.SIGTERM, EXIT_CODE, "preempted"), (signal.SIGINT, INTERRUPT_EXIT_CODE, "stopped")],  # a scheduler; Ctrl-C in a terminal
)
@pytest.mark.slow
def test_a_signal_ends_a_dpo_process_100_steps_in_within_seconds_with_a_checkpoint(tmp_path, number, code, status):
    """As a scheduler or the user at the terminal does it: a real process, a real signal."""
    process = start_at_step(tmp_path / "once", 100, max_steps=600)
    process.send_signal(number)
    signalled = time.time()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code and time.time() - signalled < 30, stderr[-2000:]
    recorded = json.loads((tmp_path / "once" / "status.json").read_text())
    assert recorded["status"] == status and recorded["step"] >= 100
    assert last_complete_checkpoint(tmp_path / "once").name == f"checkpoint-{recorded['step']}"


@pytest.mark.slow
def test_a_second_process_on_a_run_directory_is_refused_and_the_first_finishes(tmp_path):
    """The same command in two terminals: both trained into one directory, each writing its own
    checkpoints there. The second must stop at once, naming the first."""
    first = start_at_step(tmp_path / "run", 2, max_steps=150)
    started = time.time()
    second = subprocess.run(
        [sys.executable, *LONG_DPO, "dpo.max_steps=150", f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True
    )
    assert second.returncode != 0 and time.time() - started < 10
    [line] = second.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'run'} is in use by host ") and f" pid {first.pid} " in line, line
    _, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stderr[-2000:]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "done"


def test_ctrl_c_stops_a_run_with_a_checkpoint_and_the_same_command_resumes_to_the_uninterrupted_metrics(tmp_path, monkeypatch):
    from trl import SFTTrainer

    overrides = ("sft.max_steps=6", "sft.save_steps=1000", "sft.logging_steps=1", "dataset.test_size=0")
    whole = train(tmp_path / "whole", *overrides)
    with monkeypatch.context() as patch:
        signal_in_call(patch, SFTTrainer, "training_step", 3, signal.SIGINT)
        with pytest.raises(SystemExit) as stop:
            train(tmp_path / "cut", *overrides)
    assert stop.value.code == INTERRUPT_EXIT_CODE
    status = json.loads((tmp_path / "cut" / "status.json").read_text())
    assert status["status"] == "stopped" and status["step"] == 3 and "Ctrl-C" in status["error"]
    assert last_complete_checkpoint(tmp_path / "cut").name == "checkpoint-3"
    assert_same_metrics(train(tmp_path / "cut", *overrides), whole, 1e-6)


def test_a_second_signal_ends_the_process_at_once(monkeypatch):
    from rlhf import preemption

    sent = []
    monkeypatch.setattr(preemption.os, "kill", lambda pid, number: sent.append((pid, number)))
    with preemption.handled():
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)
        assert preemption.asked() and not sent  # the first: finish the step, checkpoint, exit 75
        handler(signal.SIGTERM, None)
        assert sent == [(os.getpid(), signal.SIGTERM)] and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the second: die of it
    assert not preemption.asked() and signal.getsignal(signal.SIGTERM) != handler  # the block's end puts the old handler back


def logged_step(history: Path, step: int) -> bool:
    try:
        return any(json.loads(line).get("step", 0) >= step for line in history.read_text().splitlines() if line.strip())
    except (OSError, ValueError):
        return False


@pytest.mark.slow
def test_a_resume_onto_a_retrained_upstream_run_stops_naming_it(tmp_path, monkeypatch, capsys):
    """A DPO run from an SFT run, stopped; the SFT run retrained in place with another learning
    rate; the same DPO command resumed its old adapter on the new SFT (rc 0). Without the retrain
    it resumes to the metrics of an uninterrupted run."""
    from conftest import train_through_a_crash
    from trl import DPOTrainer

    sft = tmp_path / "sft"
    sft_command = ("sft.max_steps=2", "dataset.test_size=0", "sft.save_strategy=no")
    train(sft, *sft_command)
    dpo = ("stage=dpo", f"model.init_from={sft}", "dpo.max_steps=4", "dpo.save_steps=2", "dataset.max_samples=64")
    whole = train(tmp_path / "whole", *dpo)
    assert_same_metrics(train_through_a_crash(monkeypatch, DPOTrainer, "training_step", 3, tmp_path / "same", *dpo), whole, 1e-6)

    with monkeypatch.context() as patch:
        crash_in_call(patch, DPOTrainer, "training_step", 3)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(tmp_path / "cut", *dpo)
    assert last_complete_checkpoint(tmp_path / "cut").name == "checkpoint-2"
    train(sft, *sft_command, "resume=overwrite", "sft.learning_rate=1e-3")  # retrained in place
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train(tmp_path / "cut", *dpo)
    assert stop.value.code != 0
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]  # beside progress bars
    assert "checkpoint-2 was written for other inputs than this run's" in line
    assert f"its starting policy's weights or precision (model.init_from={sft}) differ" in line
