"""Several processes, one run: torchrun with two CPU processes (gloo) trains SFT and DPO into
one complete run directory that only rank 0 writes."""

import contextlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, assert_same_metrics, compose_config, train

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


@pytest.mark.slow
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
    if stage == "dpo":  # preference metrics over the whole held-out split (60 of 600 pairs), gathered from both ranks
        assert 0 <= metrics["eval_win_rate"] <= 1 and "eval_kendall_tau" in metrics
        assert metrics["eval_pairs"] == 60  # not one rank's padded half (32): accelerate must know the CPU processes
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
        # a job near its limit is signalled, checkpoints, and comes back: the signal submitit asks for is one the run handles
        import signal

        from submitit.core.job_environment import JobEnvironment

        from rlhf.preemption import SIGNALS

        assert getattr(signal, "SIG" + JobEnvironment.USR_SIG) in SIGNALS
        assert "signal_delay_s: 300" in done.stdout and "max_num_timeout: 5" in done.stdout


@pytest.mark.slow
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
    from rlhf.command import adopt_slurm_ranks

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


@pytest.mark.slow
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


def test_a_cpu_tensor_is_summed_through_the_gpu_under_nccl(monkeypatch):
    """nccl reduces GPU tensors only: all_sum hands it a GPU copy of a CPU count and returns the
    sum on the CPU (the GPU and the collective stand in here: no GPU on this machine)."""
    import torch
    import torch.distributed as dist

    from rlhf import distributed

    moved = []

    def to_gpu(tensor):  # stands in for Tensor.cuda
        copy = tensor.clone()
        moved.append(copy)
        return copy

    def reduce(tensor, op):  # two processes holding the same value
        assert moved and tensor is moved[-1], "nccl was handed a CPU tensor"
        tensor.mul_(2)

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(dist, "all_reduce", reduce)
    monkeypatch.setattr(torch.Tensor, "cuda", to_gpu)
    count = torch.tensor(3.0)
    assert distributed.all_sum(count).item() == 6.0 and count.item() == 3.0


def test_ppo_on_cpu_processes_joins_gloo_even_where_a_gpu_is_visible(monkeypatch, tmp_path):
    """hardware=cpu computes on the CPU whatever the machine has: a launch's PPO processes join a
    gloo group, since nccl moves GPU tensors only (the visible GPU stands in here)."""
    import torch

    from rlhf import distributed
    from rlhf.context import RunContext
    from rlhf.stages import ppo

    joined = []

    @contextlib.contextmanager
    def process_group(backend):
        joined.append(backend)
        yield

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed, "process_group", process_group)
    monkeypatch.setattr(ppo, "train_ppo", lambda context: {"device": context.device.type})
    assert ppo.run(RunContext.open(compose_config("stage=ppo", "hardware=cpu"), tmp_path)) == {"device": "cpu"}
    assert joined == ["gloo"]


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_grpo_on_two_processes_counts_every_process_once(tmp_path):
    """GRPO's counts do not depend on the process count: `data/reward_cut_inputs` holds both
    processes' training answers and the held-out answers once (every process scores the same
    ones), and `time/generated_tokens_per_second` is one process's tokens over its own sampling
    time, as PPO reports it. Every row here outgrows the reward model (prompts of ~1600 tokens
    fitted to 500, an RM trained at 256), and every answer is 8 tokens long (min_new_tokens), so
    both counts are known by hand."""
    data = tmp_path / "long.jsonl"
    long_prompt = "今天天气很好，我们去公园散步吧。" * 110  # ~1600 tokens of the tiny model's tokenizer
    data.write_text("".join(json.dumps({"instruction": f"{i}. {long_prompt}", "input": "", "output": "好的。"}) + "\n" for i in range(16)))
    train(tmp_path / "rm", "stage=rm", "rm.max_steps=2", "rm.max_length=256")
    run_dir = tmp_path / "grpo"
    done = subprocess.run(
        [
            TORCHRUN,
            "--nproc_per_node=2",
            "train.py",
            "stage=grpo",
            "hardware=multi_gpu",
            f"hydra.run.dir={run_dir}",
            f"grpo.reward_model={tmp_path / 'rm'}",
            "dataset=builtin_sft",
            f"dataset.path={data}",
            "dataset.test_size=0.25",
            "grpo.max_steps=1",
            "grpo.per_device_train_batch_size=4",  # answers per process and update
            "grpo.gradient_accumulation_steps=1",
            "grpo.num_generations=2",
            "grpo.max_prompt_length=500",
            "grpo.max_completion_length=8",
            "+grpo.generation_kwargs={min_new_tokens:8}",  # no answer ends early: 8 tokens each
            "grpo.eval_prompts=4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data/reward_cut_inputs"] == 2 * 4 + 4 + 4  # two processes' 4 answers, the 4 held-out answers before and after
    assert metrics["completions/clipped_ratio"] == 1.0  # every answer is 8 tokens long
    assert metrics["time/generated_tokens_per_second"] * metrics["time/generation_per_update"] == pytest.approx(4 * 8)


def ppo_update(rank: int, world: int, directory: str, model_path: str) -> None:
    """One PPO optimisation phase (2 epochs of one global mini-batch) on this process's share of
    a fixed rollout of 4 responses of 1, 2, 7 and 8 tokens; saves the trained weights."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from rlhf.generation import Samples
    from rlhf.ppo.trainer import PPOConfig, PPOModels, PPOTrainer, Rollout, ValueHead

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64)
        models = PPOModels(policy, None, ValueHead(policy.config.hidden_size), None, None)
        settings = PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=2, max_grad_norm=1e9, vf_coef=0.5)
        trainer = PPOTrainer(models, settings, torch.device("cpu"), log=None)
        trainer.optimizer = torch.optim.SGD(trainer.trainable, lr=0.5)  # the update is the gradient itself

        generator = torch.Generator().manual_seed(1)
        lengths = torch.tensor([1, 2, 7, 8])
        response_mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
        sequences = torch.randint(3, policy.config.vocab_size, (4, 11), generator=generator)
        prompt_mask = torch.ones(4, 3, dtype=torch.long)
        prompt_mask[:2, 0] = 0  # left padding
        samples = Samples(sequences, torch.cat([prompt_mask, response_mask], dim=1), response_mask.float(), [""] * 4, torch.ones(4))
        per_token = lambda: torch.randn(4, 8, generator=generator) * response_mask  # noqa: E731
        old_logprobs, values, advantages, returns = -3 + per_token(), per_token(), per_token(), per_token()

        share = slice(rank * 4 // world, (rank + 1) * 4 // world)  # rank 0: the two short responses
        rollout = Rollout(samples.select(torch.arange(4)[share]), old_logprobs[share], None, values[share], None, None)
        stats = trainer.optimise(rollout, advantages[share], returns[share], update=1)
        torch.save(
            {"weights": {n: p.detach() for n, p in policy.named_parameters()}, "stats": stats}, f"{directory}/update-{world}-{rank}.pt"
        )
    finally:
        if world > 1:
            dist.destroy_process_group()


@pytest.mark.slow
def test_a_ppo_update_on_two_processes_equals_the_update_on_one(tmp_path):
    """The global batch's responses are uneven (rank 0 holds 3 tokens, rank 1 holds 15): the update
    is that of the mean over all 18 tokens either way, not the mean of two per-process means."""
    import torch
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    from rlhf.tiny_model import ensure_tiny_model

    model = str(ensure_tiny_model())
    ppo_update(0, 1, str(tmp_path), model)
    mp.spawn(ppo_update, args=(2, str(tmp_path), model), nprocs=2)
    one, two = torch.load(tmp_path / "update-1-0.pt"), torch.load(tmp_path / "update-2-0.pt")
    start = dict(AutoModelForCausalLM.from_pretrained(model).named_parameters())
    moved = max((one["weights"][name] - start[name].double()).abs().max().item() for name in start)
    assert moved > 1e-3  # the update did something
    for name, weight in one["weights"].items():
        assert torch.allclose(two["weights"][name], weight, atol=1e-6, rtol=0), name
    for key, value in one["stats"].items():
        assert two["stats"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


def ref_cache_decision(rank: int, directory: str) -> None:
    """A DPO job whose two ranks see different caches (node-local: only rank 0's holds the file)."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from safetensors.torch import save_file

    from rlhf.dpo_trainer import KLDPOTrainer
    from rlhf.ref_logps import REF_COLUMNS

    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=2)
    try:
        path = Path(directory) / f"node-{rank}" / "ref.safetensors"
        path.parent.mkdir()
        if rank == 0:
            save_file({column: torch.tensor([-1.0, -2.0, -3.0]) for column in REF_COLUMNS}, str(path))
        computed = []

        def trl_reference_logps(dataset, name, batch_size):  # TRL's collective precompute: must not be entered alone
            computed.append(name)
            return dataset.add_column(REF_COLUMNS[0], [0.0] * 3).add_column(REF_COLUMNS[1], [0.0] * 3)

        trainer = SimpleNamespace(
            args=SimpleNamespace(ref_cache=True),
            reference_identity="the reference",
            accelerator=SimpleNamespace(is_main_process=rank == 0, num_processes=2),
            rows_reached=lambda name, rows: rows,
            run_metrics={},
            ref_cache_path=lambda dataset: path,
            trl_reference_logps=trl_reference_logps,
        )
        dataset = KLDPOTrainer._cached_ref_logps(trainer, Dataset.from_dict({"prompt": ["a", "b", "c"]}), "train", 2)
        result = {"computed": computed, "chosen": list(dataset[REF_COLUMNS[0]])}
        (Path(directory) / f"rank-{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_take_rank_zeros_reference_cache_decision(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(ref_cache_decision, args=(str(tmp_path),), nprocs=2)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert result == {"computed": [], "chosen": [-1.0, -2.0, -3.0]}, rank
