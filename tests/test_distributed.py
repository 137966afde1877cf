"""Several processes, one run: torchrun with two CPU processes (gloo) trains SFT and DPO into
one complete run directory that only rank 0 writes."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_torchrun_two_processes_leave_one_complete_run(tmp_path, stage):
    done = subprocess.run(
        [TORCHRUN, "--nproc_per_node=2", "train.py", f"stage={stage}", "hardware=multi_gpu", f"hydra.run.dir={tmp_path}",
         f"{stage}.max_steps=4", f"{stage}.eval_steps=2", f"{stage}.logging_steps=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("metrics.json", "history.jsonl", "env.json", "status.json", ".hydra/config.yaml", "final/adapter_config.json"):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # two ranks of 16 rows make an epoch of the 540 training rows ceil(540 / 32) = 17 steps long
    # (one process would need 34): the data really is split between the ranks
    assert metrics["epoch"] == pytest.approx(4 / math.ceil(540 / (2 * 16)))
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [2, 4]  # written once, by rank 0 only
    if stage == "dpo":  # preference metrics over the whole held-out split, gathered from both ranks
        assert 0 <= metrics["eval_win_rate"] <= 1 and "eval_kendall_tau" in metrics
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "done"


def test_ranks_of_one_launch_agree_on_the_run_directory(monkeypatch):
    from rlhf import launch_stamp

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abcdef1234567890")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_stamp() == "distributed-abcdef123456"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch_stamp() != "distributed-abcdef123456"
