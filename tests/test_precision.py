"""Mixed precision where the hardware has it: on the CPU preset a real model trains in bfloat16
autocast (float32 weights) when the CPU has bfloat16 matrix units, the tiny model in float32,
`hardware.training_args.bf16` forces either; the choice is printed and recorded in env.json,
and the stages with their own loops (PPO, eval) use the same autocast."""

import json
import math

from conftest import assert_same_metrics, compose_config, train, train_through_a_crash

from rlhf import cpu_bf16, precision


def test_the_cpu_preset_chooses_bfloat16_where_the_cpu_has_it_and_never_for_the_tiny_model():
    real = compose_config("model=smollm2-135m", "stage=dpo")
    assert real.hardware.training_args.bf16 is cpu_bf16()
    assert precision(real) == "float32 weights" + (", bfloat16 autocast" if cpu_bf16() else "")
    assert compose_config("stage=dpo").hardware.training_args.bf16 is False  # model=tiny: float32 is faster
    assert compose_config("model=smollm2-135m", "hardware.training_args.bf16=false").hardware.training_args.bf16 is False
    assert compose_config("hardware.training_args.bf16=true").hardware.training_args.bf16 is True


def test_cpu_bf16_reads_the_cpu_flags(monkeypatch, tmp_path):
    from pathlib import Path

    cpuinfo = tmp_path / "cpuinfo"
    original = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: original(cpuinfo if str(self) == "/proc/cpuinfo" else self, *a, **k))
    cpuinfo.write_text("flags : fpu sse avx512f avx512_bf16\n")
    assert cpu_bf16() is True
    cpuinfo.write_text("flags : fpu sse avx2\n")
    assert cpu_bf16() is False


def test_ppo_and_eval_run_under_bfloat16_autocast_when_asked(rlhf_chain, tmp_path, capsys):
    chain_dir, _ = rlhf_chain
    forced = "hardware.training_args.bf16=true"
    metrics = train(
        tmp_path / "ppo",
        "stage=ppo",
        f"model.init_from={chain_dir / 'sft'}",
        f"ppo.reward_model={chain_dir / 'rm'}",
        "ppo.total_updates=2",
        "ppo.eval_prompts=16",
        forced,
    )
    assert all(math.isfinite(metrics[key]) for key in ("eval_scores", "objective/kl", "loss/policy"))
    # The policy moves: before autocast's weight cache was switched off, every forward pass inside
    # PPO's one autocast block used the starting adapter (KL, approxkl and the gain were exactly 0).
    assert metrics["policy/approxkl"] > 0 and metrics["objective/kl"] != 0 and metrics["eval_score_gain"] != 0
    assert "precision: float32 weights, bfloat16 autocast" in capsys.readouterr().out
    assert json.loads((tmp_path / "ppo" / "env.json").read_text())["precision"] == "float32 weights, bfloat16 autocast"
    judged = train(
        tmp_path / "eval",
        "stage=eval",
        f"eval.policy={tmp_path / 'ppo'}",
        f"eval.reward_model={chain_dir / 'rm'}",
        "eval.num_prompts=8",
        forced,
    )
    assert 0 <= judged["eval_win_rate"] <= 1 and math.isfinite(judged["eval_kl"])


def test_ppo_moves_a_policy_over_bfloat16_weights(rlhf_chain, tmp_path):
    """The GPU presets' case (bfloat16 weights under bfloat16 autocast), here on the CPU: PPO's
    own forward passes see the adapter it trains."""
    chain_dir, _ = rlhf_chain
    metrics = train(
        tmp_path,
        "stage=ppo",
        f"model.init_from={chain_dir / 'sft'}",
        f"ppo.reward_model={chain_dir / 'rm'}",
        "ppo.total_updates=3",
        "ppo.eval_prompts=16",
        "hardware.dtype=bfloat16",
        "hardware.training_args.bf16=true",
    )
    assert metrics["policy/approxkl"] > 0 and metrics["objective/kl"] != 0 and metrics["eval_score_gain"] != 0


def test_a_bfloat16_dpo_run_crashed_midway_resumes_to_the_metrics_of_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    from trl import DPOTrainer

    overrides = ("stage=dpo", "hardware.training_args.bf16=true", "dpo.max_steps=10", "dpo.save_steps=5", "dpo.eval_steps=5")
    whole = train(tmp_path / "whole", *overrides)
    capsys.readouterr()
    resumed = train_through_a_crash(monkeypatch, DPOTrainer, "training_step", 7, tmp_path / "crashed", *overrides)
    assert "resuming from" in capsys.readouterr().out  # from checkpoint-5, not from the start
    assert json.loads((tmp_path / "crashed" / "env.json").read_text())["precision"] == "float32 weights, bfloat16 autocast"
    assert_same_metrics(resumed, whole, 1e-6)


def test_lora_updates_below_a_bfloat16_step_survive_autocast():
    import torch
    from peft import LoraConfig, get_peft_model

    from rlhf.training import float32_adapter_sums

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.proj(x)

    def adapted():
        torch.manual_seed(0)
        layer = Layer()
        layer.proj.weight.data = torch.eye(4) * 4.0  # outputs of 4..16: a bfloat16 step there is 1/32 or more
        model = get_peft_model(layer, LoraConfig(r=2, lora_alpha=2, target_modules=["proj"]))
        torch.nn.init.constant_(model.base_model.model.proj.lora_B["default"].weight, 1e-3)  # an update of ~4e-3
        return model

    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    model = adapted()
    with torch.no_grad():
        exact = model(x)
        update = exact - 4.0 * x
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded_away = model(x).float()
            float32_adapter_sums(model, True)
            kept = model(x).float()
    assert update.abs().min() > 1e-3
    assert torch.equal(rounded_away, 4.0 * x)  # autocast alone: the adapter's update is lost entirely
    assert (kept - exact).abs().max() < 0.02 * update.abs().min()  # summed in float32: kept
    float32_adapter_sums(model, True)  # a second call adds no second hook
    assert len(model.base_model.model.proj.base_layer._forward_hooks) == 1
    untouched = adapted()
    float32_adapter_sums(untouched, False)  # no autocast: nothing to do
    assert not untouched.base_model.model.proj.base_layer._forward_hooks
