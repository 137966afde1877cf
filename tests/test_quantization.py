"""QLoRA on the CPU: 4-bit and 8-bit base weights train a LoRA adapter, with evaluation
between training steps (the AVX512-BF16 pitfall of bitsandbytes' CPU path included)."""

import math

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


@pytest.mark.slow
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


def test_eval_loads_qlora_policies_and_reward_models_over_the_4bit_base_they_trained_on(tmp_path):
    """An adapter trained over 4-bit weights is evaluated over them (it was loaded over the
    unquantized base, another model than the one trained), and so is a reward model that scores."""
    from bitsandbytes.nn import Linear4bit
    from conftest import compose_config

    from rlhf.context import RunContext
    from rlhf.lineage import POLICY_STAGES, TrainedRun
    from rlhf.reward_model import load_reward_model
    from rlhf.stages.eval import load_policy_and_reference

    quick = ("quantization=4bit", "dataset.test_size=0")
    train(tmp_path / "sft", "stage=sft", *quick, "sft.max_steps=2", "sft.save_strategy=no")
    train(tmp_path / "rm", "stage=rm", *quick, "rm.max_steps=2", "rm.save_strategy=no", "rm.eval_strategy=no")
    evaluation = ("stage=eval", f"eval.policy={tmp_path / 'sft'}", f"eval.reward_model={tmp_path / 'rm'}", "eval.num_prompts=4")
    cfg = compose_config(*evaluation)
    assert cfg.quantization is None  # eval's own setting: the runs it loads say how they trained

    def quantized(model) -> bool:
        return any(isinstance(module, Linear4bit) for module in model.modules())

    policy, reference = load_policy_and_reference(TrainedRun.of(tmp_path / "sft", "eval.policy", POLICY_STAGES), cfg)
    assert quantized(policy) and reference is None  # the reference is the same 4-bit base, adapter disabled
    context = RunContext.open(compose_config(*evaluation), tmp_path / "eval")
    assert quantized(load_reward_model(context.runs["eval.reward_model"], context).model)
    metrics = train(tmp_path / "eval", *evaluation, "eval.max_new_tokens=8")
    assert 0 <= metrics["eval_win_rate"] <= 1 and math.isfinite(metrics["eval_kl"])
