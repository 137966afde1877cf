"""Several processes, one run: torchrun with two CPU processes (gloo) trains SFT and DPO into
one complete run directory that only rank 0 writes."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, assert_same_metrics

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_torchrun_two_processes_leave_one_complete_run(tmp_path, stage):
    done = subprocess.run(
        [
            TORCHRUN,
            "--nproc_per_node=2",
            "train.py",
            f"stage={stage}",
            "hardware=multi_gpu",
            f"hydra.run.dir={tmp_path}",
            f"{stage}.max_steps=4",
            f"{stage}.eval_steps=2",
            f"{stage}.logging_steps=2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
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


@pytest.mark.parametrize("launcher", ["submitit_slurm", "slurm_multi_gpu", "joblib", "submitit_local"])
def test_cluster_launchers_compose(launcher):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the [cluster] extra is not installed")
    from conftest import cli

    done = cli(f"hydra/launcher={launcher}", "--cfg", "hydra")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "launcher:" in done.stdout and "_target_: hydra_plugins.hydra_" in done.stdout
    if launcher == "slurm_multi_gpu":
        assert "tasks_per_node: 8" in done.stdout and "gpus_per_node: 8" in done.stdout


def test_joblib_sweep_runs_jobs_in_parallel_processes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the [cluster] extra is not installed")
    from conftest import cli

    done = cli(
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "stage=dpo",
        "dpo.beta=0.1,0.3",
        "-m",
        f"hydra.sweep.dir={tmp_path}",
        "dpo.max_steps=2",
        "dataset.test_size=0",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for job in ("0", "1"):
        assert json.loads((tmp_path / job / "status.json").read_text())["status"] == "done"
        assert (tmp_path / job / "final" / "adapter_config.json").is_file()
    assert "job 1 [stage=dpo,dpo.beta=0.3" in done.stdout


def test_slurm_tasks_become_torch_ranks(monkeypatch):
    pytest.importorskip("submitit", reason="the [cluster] extra is not installed")
    from rlhf.run import adopt_slurm_ranks

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "unset")  # recorded, so the test's exports are undone afterwards
        monkeypatch.delenv(key)
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "node7",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODEID": "0",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    adopt_slurm_ranks()
    import os

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"], os.environ["MASTER_ADDR"]) == ("1", "2", "1", "node7")


def whiten_on_two_ranks(rank: int, directory: str, halves: list) -> None:
    import torch
    import torch.distributed as dist

    from rlhf import distributed
    from rlhf.ppo import core

    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=2)
    try:
        values, mask = halves[rank]
        torch.save(core.masked_whiten(values, mask, reduce=distributed.all_sum), f"{directory}/whitened-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_whitening_over_two_ranks_equals_whitening_the_gathered_batch(tmp_path):
    import torch
    import torch.multiprocessing as mp

    from rlhf.ppo import core

    generator = torch.Generator().manual_seed(0)
    values = torch.randn(8, 6, generator=generator, dtype=torch.float64) * 3 + 1
    mask = (torch.rand(8, 6, generator=generator) > 0.3).long()
    mask[:, 0] = 1
    halves = [(values[:4], mask[:4]), (values[4:], mask[4:])]
    mp.spawn(whiten_on_two_ranks, args=(str(tmp_path), halves), nprocs=2)
    out = [torch.load(tmp_path / f"whitened-{rank}.pt") for rank in (0, 1)]
    assert torch.allclose(torch.cat(out), core.masked_whiten(values, mask), atol=1e-12)
    assert not torch.allclose(out[0], core.masked_whiten(*halves[0]))  # each half alone would whiten differently


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_ppo_on_two_processes_trains_one_run_and_resumes_exactly(rlhf_chain, tmp_path):
    """ppo.batch_size is global: each of two processes samples half of it; gradients, whitening
    and the KL statistic are those of the whole batch; rank 0 writes one history line per update.
    A run cut off after its checkpoint resumes, on as many processes, to the same metrics."""
    chain_dir, _ = rlhf_chain
    overrides = (
        "stage=ppo",
        "hardware=multi_gpu",
        f"model.init_from={chain_dir / 'sft'}",
        f"ppo.reward_model={chain_dir / 'rm'}",
        "ppo.total_updates=12",
        "ppo.save_steps=6",
    )

    def torchrun(run_dir):
        done = subprocess.run(
            [TORCHRUN, "--nproc_per_node=2", "train.py", *overrides, f"hydra.run.dir={run_dir}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((run_dir / "metrics.json").read_text()), done.stdout

    whole, _ = torchrun(tmp_path / "whole")
    steps = [json.loads(line)["step"] for line in (tmp_path / "whole" / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # exactly one line per update
    assert whole["eval_scores"] > whole["eval_scores_before"] + 0.5

    # What a run killed after update 8 leaves: the checkpoint of update 6 and history up to 8.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    for name in ("metrics.json", "final"):
        shutil.rmtree(cut / name) if (cut / name).is_dir() else (cut / name).unlink()
    lines = (cut / "history.jsonl").read_text().splitlines()
    (cut / "history.jsonl").write_text("\n".join(lines[:8]) + "\n")
    (cut / "status.json").write_text('{"status": "running"}')
    resumed, stdout = torchrun(cut)
    assert "resuming from" in stdout and "checkpoint-6" in stdout
    assert_same_metrics(resumed, whole, 1e-5)
    steps = [json.loads(line)["step"] for line in (cut / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
