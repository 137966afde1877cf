"""`hydra/launcher=gpu_pool`: a sweep's jobs run in parallel, one per device, each seeing only
its device. On this CPU machine a device list still assigns CUDA_VISIBLE_DEVICES, which each
job's env.json records."""

import json
import os

import pytest
from conftest import cli

pytest.importorskip("cloudpickle")


@pytest.mark.slow
def test_four_jobs_on_two_devices_run_two_at_a_time(tmp_path):
    sweep = tmp_path / "S"
    done = cli(
        "hydra/launcher=gpu_pool",
        "hydra.launcher.devices=[0,1]",
        "stage=dpo",
        "dpo.beta=0.1,0.2,0.3,0.4",
        "dpo.max_steps=2",
        "dpo.eval_strategy=no",
        "dataset.max_samples=64",
        f"hydra.sweep.dir={sweep}",
        "-m",
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    spans, devices = [], []
    for job in range(4):
        env = sweep / str(job) / "env.json"
        devices.append(json.loads(env.read_text())["cuda_visible_devices"])
        spans.append((env.stat().st_mtime, (sweep / str(job) / "metrics.json").stat().st_mtime))  # from start to end of the stage
    assert sorted(set(devices)) == ["0", "1"], devices
    most_at_once = max(sum(1 for start, end in spans if start <= moment < end) for moment, _ in spans)
    assert most_at_once == 2, spans  # in parallel, and never more jobs than devices
    for job in range(4):
        assert json.loads((sweep / str(job) / "status.json").read_text())["status"] == "done"


@pytest.mark.slow
def test_without_devices_or_gpus_jobs_run_one_at_a_time(tmp_path):
    sweep = tmp_path / "S"
    done = cli("hydra/launcher=gpu_pool", "stage=sft", "sft.max_steps=1", "sft.eval_strategy=no", f"hydra.sweep.dir={sweep}", "-m")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no GPU visible and no hydra.launcher.devices given: the jobs run one at a time" in done.stdout + done.stderr
    # the variable is left as the launch had it (unset on a plain CPU machine)
    assert json.loads((sweep / "0" / "env.json").read_text())["cuda_visible_devices"] == os.environ.get("CUDA_VISIBLE_DEVICES")
