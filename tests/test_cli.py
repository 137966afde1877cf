"""The command line as users run it: run directories, sweeps, reproduction from a saved
config, fast config-only commands, and one-line errors."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, cli

RUN_FILES = ("metrics.json", "history.jsonl", "env.json", ".hydra/config.yaml", ".hydra/overrides.yaml")


def assert_complete_run(run_dir):
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), f"{run_dir} lacks {name}"
    assert (run_dir / "final" / "adapter_config.json").is_file()
    assert (run_dir / "final" / "tokenizer_config.json").is_file()
    env = json.loads((run_dir / "env.json").read_text())
    assert env["seed"] == 42 and env["packages"]["trl"] and "train.py" in env["command"]


@pytest.mark.parametrize("flag", [["--help"], ["--cfg", "job"], ["stage=dpo", "--cfg", "job"]])
def test_config_only_commands_do_not_import_torch(flag):
    done = cli(*flag, python_flags=("-X", "importtime"))  # every import, logged to stderr
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "hydra" in imported
    assert not {"torch", "transformers", "trl", "peft", "datasets"} & imported


@pytest.mark.parametrize("key, flags", [("hydra.run.dir", []), ("hydra.sweep.dir", ["-m", "peft.r=4,8"])], ids=["run", "sweep"])
def test_a_run_directory_under_a_file_fails_with_one_line(tmp_path, key, flags):
    file = tmp_path / "a_file"
    file.write_text("not a directory")
    done = cli(*flags, f"{key}={file}/out")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    expected = f"error: {key}={file}/out: the run directory cannot be created: {file} is a file, not a directory"
    assert done.stderr.strip().splitlines() == [expected]


@pytest.mark.slow
def test_vllm_without_cuda_is_refused_before_trl_loads(tmp_path):
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM can run here")
    done = cli("stage=grpo", "grpo.use_vllm=true", f"hydra.run.dir={tmp_path}", python_flags=("-X", "importtime"))
    assert done.returncode == 2 and "grpo.use_vllm=true needs a CUDA GPU" in done.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and not {"trl", "transformers", "peft"} & imported  # TRL alone takes ~10 s to import


def test_every_job_of_a_sweep_resolves_the_launch_s_directory(monkeypatch):
    """Hydra composes each job's config anew and hands it the launch's resolver cache: the sweep
    directory's stamp must come from that cache, not from the clock when a job starts (which
    scattered the jobs of `dpo.beta=0.1,0.3 -m` over one directory per second)."""
    import time

    from omegaconf import OmegaConf

    import rlhf

    clock = iter(["10-00-00", "10-00-07", "10-00-15"])  # the launch, then two jobs starting later
    monkeypatch.setattr(time, "strftime", lambda pattern: next(clock))
    master = OmegaConf.create({"sweep_dir": "multirun/${launch_stamp:}"})
    assert master.sweep_dir == "multirun/10-00-00"
    for _ in range(2):  # what Hydra's load_sweep_config does for each job
        job = OmegaConf.create({"sweep_dir": "multirun/${launch_stamp:}"})
        OmegaConf.copy_cache(from_config=master, to_config=job)
        assert job.sweep_dir == "multirun/10-00-00"
    assert rlhf.launch_stamp() == "10-00-07"  # the clock itself moved on


@pytest.mark.slow
def test_default_run_leaves_a_complete_run_directory(tmp_path):
    done = cli(f"hydra.run.dir={tmp_path}", "sft.max_steps=10")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_complete_run(tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["train_loss"] > 0 and "eval_loss" in metrics
    assert "final metrics" in done.stdout and "train_loss" in done.stdout

    from peft import AutoPeftModelForCausalLM  # the adapter loads with plain peft

    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "final")
    assert model.peft_config["default"].r == 16


@pytest.mark.slow
def test_dpo_beta_sweep_then_reproduce_a_job(tmp_path):
    sweep = tmp_path / "S"
    done = cli("stage=dpo", "dpo.beta=0.1,0.3", "-m", f"hydra.sweep.dir={sweep}", "dpo.max_steps=12")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = {}
    for job, beta in (("0", 0.1), ("1", 0.3)):
        assert_complete_run(sweep / job)
        assert yaml.safe_load((sweep / job / ".hydra/config.yaml").read_text())["dpo"]["beta"] == beta
        metrics[job] = json.loads((sweep / job / "metrics.json").read_text())
    assert metrics["0"]["train_loss"] != metrics["1"]["train_loss"]

    # The same sweep again into its directory: every job is already done, none is an error.
    again = cli("stage=dpo", "dpo.beta=0.1,0.3", "-m", f"hydra.sweep.dir={sweep}", "dpo.max_steps=12")
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [line for line in (again.stdout + again.stderr).splitlines() if line.startswith("error:")]
    assert again.stdout.count("already finished with this config; skipped") == 2
    assert json.loads((sweep / "0" / "metrics.json").read_text()) == metrics["0"]  # untouched

    # Comparing the two jobs, offline.
    done = subprocess.run(
        [sys.executable, "-m", "rlhf.compare", str(sweep), "--sort", "eval_win_rate"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "dpo.beta=0.1" in done.stdout and "dpo.beta=0.3" in done.stdout and "eval_win_rate" in done.stdout
    csv_text = (sweep / "compare.csv").read_text()
    assert csv_text.count("\n") == 3 and "eval_kendall_tau" in csv_text.splitlines()[0]
    assert (sweep / "compare.png").read_bytes().startswith(b"\x89PNG")

    # The reproduce command of docs/reliability.md: re-run job 1 from its saved config alone.
    rerun = tmp_path / "R"
    done = cli("--config-path", str(sweep / "1" / ".hydra"), "--config-name", "config", f"hydra.run.dir={rerun}", "reuse=false")
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((rerun / "metrics.json").read_text())
    for key, value in metrics["1"].items():
        if "loss" in key or key.startswith("eval_rewards"):
            assert again[key] == pytest.approx(value, abs=1e-6), key

    # A config saved before the DPO settings moved to rlhf/dpo_trainer.py names rlhf.trainers.KLDPOConfig: it still re-runs
    old = tmp_path / "old-config"
    shutil.copytree(sweep / "1" / ".hydra", old)
    saved = (old / "config.yaml").read_text()
    assert "_target_: rlhf.dpo_trainer.KLDPOConfig" in saved
    (old / "config.yaml").write_text(saved.replace("rlhf.dpo_trainer.KLDPOConfig", "rlhf.trainers.KLDPOConfig"))
    done = cli("--config-path", str(old), "--config-name", "config", f"hydra.run.dir={tmp_path / 'O'}", "reuse=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "O" / "metrics.json").read_text())["train_loss"] == pytest.approx(metrics["1"]["train_loss"], abs=1e-6)


@pytest.mark.slow
def test_lora_rank_sweep(tmp_path):
    done = cli("peft.r=8,16", "-m", f"hydra.sweep.dir={tmp_path}", "sft.max_steps=5", "dataset.test_size=0")
    assert done.returncode == 0, done.stderr[-3000:]
    for job, rank in (("0", 8), ("1", 16)):
        assert json.loads((tmp_path / job / "final" / "adapter_config.json").read_text())["r"] == rank


@pytest.mark.slow
def test_missing_model_fails_with_one_line(tmp_path):
    done = cli("model=qwen3-0.6b", f"hydra.run.dir={tmp_path}")  # HF_HUB_OFFLINE=1 and no local copy
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: model 'Qwen/Qwen3-0.6B'") and "model.name_or_path=" in error


def test_unknown_stage_lists_the_valid_ones():
    done = cli("stage=ppo_typo")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    options = "chain, dpo, eval, grpo, ppo, rloo, rm, sft"
    assert done.stderr.strip() == f"error: stage=ppo_typo: no stage config named ppo_typo; options: {options}"


@pytest.mark.slow
def test_wrong_data_kind_fails_with_one_line(tmp_path):
    done = cli("stage=dpo", "dataset=builtin_sft", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "preference data" in done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "argument, recorded",
    [
        ("+hub_token=abc", "+hub_token=***"),
        ("logger.api_key=abc", "logger.api_key=***"),
        ("ppo.max_new_tokens=32", "ppo.max_new_tokens=32"),  # a hyperparameter, kept for reproduction
        ("dpo.beta=0.1", "dpo.beta=0.1"),
    ],
)
def test_credentials_are_masked_in_the_recorded_command(argument, recorded):
    from rlhf.command import redact

    assert redact(argument) == recorded
