"""QLoRA on the CPU: 4-bit and 8-bit base weights train a LoRA adapter, with evaluation
between training steps (the AVX512-BF16 pitfall of bitsandbytes' CPU path included)."""

import pytest
from conftest import train

pytest.importorskip("bitsandbytes", reason="the [quantization] extra is not installed")


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_dpo_trains_with_evaluation_on(tmp_path, bits):
    metrics = train(tmp_path, "stage=dpo", f"quantization={bits}", "dpo.max_steps=10", "dpo.eval_steps=5", "dpo.logging_steps=5")
    assert metrics["train_loss"] > 0 and metrics["eval_win_rate"] > 0.5
    import json

    evals = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert len(evals) >= 2  # an evaluation mid-training, then training went on


def test_quantized_layers_are_really_quantized(tmp_path):
    from bitsandbytes.nn import Linear4bit
    from conftest import compose_config

    from rlhf.models import load_model, resolve_model_path

    cfg = compose_config("quantization=4bit")
    model = load_model(resolve_model_path(cfg.model), cfg.model, cfg.quantization, cfg.hardware)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(not layer.support_avx512bf16_for_cpu for layer in layers)


def test_every_stage_trains_quantized_also_on_top_of_lora_runs(tmp_path):
    """Reward model and PPO (policy with value head) in 4 bits; PPO starts from a LoRA SFT run,
    whose adapter is stacked unmerged beside the 4-bit base."""
    sft = tmp_path / "sft"
    train(sft, "stage=sft", "sft.max_steps=5", "dataset.test_size=0")
    rm = train(tmp_path / "rm", "stage=rm", "quantization=4bit", "rm.max_steps=10", "rm.eval_steps=5")
    assert rm["eval_accuracy"] >= 0.5
    ppo = train(
        tmp_path / "ppo",
        "stage=ppo",
        "quantization=4bit",
        f"model.init_from={sft}",
        f"ppo.reward_model={tmp_path / 'rm'}",
        "ppo.total_updates=2",
        "ppo.batch_size=8",
        "ppo.mini_batch_size=4",
        "dataset.test_size=0",
    )
    assert "objective/scores" in ppo and (tmp_path / "ppo" / "final" / "value_head.safetensors").is_file()
    import json

    lineage = json.loads((tmp_path / "ppo" / "final" / "lineage.json").read_text())["trained_on"]
    assert lineage["adapters_applied"] == "stacked beside the base"  # merged into 4-bit weights it would round away
