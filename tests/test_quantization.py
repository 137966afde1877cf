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
    from omegaconf import OmegaConf

    from conftest import compose_config
    from rlhf.models import load_model, resolve_model_path

    cfg = compose_config("quantization=4bit")
    model = load_model(resolve_model_path(cfg.model), [], cfg.model, cfg.quantization, cfg.hardware)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(not layer.support_avx512bf16_for_cpu for layer in layers)
    assert OmegaConf.select(cfg, "quantization.bnb_4bit_use_double_quant") is True
