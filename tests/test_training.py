"""Real tiny trainings, in this process: the loss falls, DPO margins rise, weights change, and
the same config trains to the same numbers."""

import json

import pytest
import torch
from conftest import history, train
from safetensors.torch import load_file


def lora_b_norm(final_dir) -> float:
    """LoRA initialises every B matrix to zero: a non-zero norm means the adapter trained."""
    weights = load_file(str(final_dir / "adapter_model.safetensors"))
    return sum(float(t.norm()) for name, t in weights.items() if "lora_B" in name)


def test_sft_loss_falls_and_adapter_trains(tmp_path):
    metrics = train(tmp_path, "stage=sft", "sft.max_steps=40")
    losses = history(tmp_path, "loss")
    assert len(losses) >= 6
    assert losses[-1] < 0.6 * losses[0], losses
    assert metrics["train_loss"] > 0 and metrics["eval_loss"] < losses[0]
    assert lora_b_norm(tmp_path / "final") > 0
    assert (tmp_path / "final" / "tokenizer.json").exists()


def test_dpo_margins_rise_and_adapter_trains(tmp_path):
    metrics = train(tmp_path, "stage=dpo", "dpo.max_steps=30")
    margins = history(tmp_path, "rewards/margins")
    assert margins[-1] > margins[0] + 0.5, margins
    losses = history(tmp_path, "loss")
    assert losses[-1] < losses[0], losses
    assert metrics["eval_rewards/accuracies"] >= 0.9
    assert metrics["eval_rewards/margins"] > 0.5
    assert lora_b_norm(tmp_path / "final") > 0


def test_full_finetuning_changes_the_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf.tiny_model import ensure_tiny_model

    train(tmp_path, "stage=sft", "peft=none", "sft.max_steps=10", "dataset.test_size=0")
    before = AutoModelForCausalLM.from_pretrained(ensure_tiny_model()).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) > len(before) // 2
    assert "eval_loss" not in json.loads((tmp_path / "metrics.json").read_text())  # no eval split asked for


def test_same_config_same_metrics(tmp_path):
    first = train(tmp_path / "a", "stage=dpo", "dpo.max_steps=8")
    second = train(tmp_path / "b", "stage=dpo", "dpo.max_steps=8")
    for key in ("train_loss", "eval_loss", "eval_rewards/margins"):
        assert first[key] == pytest.approx(second[key], abs=1e-6)


def test_dpo_with_lora_keeps_no_reference_copy(tmp_path, monkeypatch):
    """Under LoRA, TRL must get no ref_model: the reference is the adapter-disabled policy."""
    import trl

    seen = {}
    original = trl.DPOTrainer.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen["ref_model"] = self.ref_model

    monkeypatch.setattr(trl.DPOTrainer, "__init__", spy)
    train(tmp_path, "stage=dpo", "dpo.max_steps=1", "dataset.test_size=0")
    assert seen["ref_model"] is None


def test_a_run_repeats_exactly_in_the_same_process(tmp_path):
    """Weights a checkpoint lacks (a reward model's score head) are drawn from the run's seed:
    the same run twice, one after the other in one process, trains to the same numbers."""
    runs = [train(tmp_path / str(i), "stage=rm", "rm.max_steps=3") for i in range(2)]
    assert runs[0]["train_loss"] == runs[1]["train_loss"] and runs[0]["eval_loss"] == runs[1]["eval_loss"]
