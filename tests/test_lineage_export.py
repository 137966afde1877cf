"""A run's final/ loads as it was trained, and exports to one standalone model.

The trained model is rebuilt here by hand with plain transformers + peft (base model, the SFT
adapter merged, the run's own adapter on top), independently of the project's lineage code,
and compared with what a user gets from final/ or from `rlhf.export`."""

import json
from pathlib import Path

import pytest
import torch
from conftest import train
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf.errors import UserError
from rlhf.export import SAMPLE_CONVERSATIONS, export

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def dpo_chain(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dpo_chain")
    train(run_dir, "experiment=dpo_chain", "sft.max_steps=20", "dpo.max_steps=10")
    return run_dir


def sample_batch(run_dir: Path) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    texts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in SAMPLE_CONVERSATIONS]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def raw_base(run_dir: Path) -> str:
    return json.loads((run_dir / "final" / "lineage.json").read_text())["trained_on"]["base"]["path"]


def by_hand(run_dir: Path, sft_dir: Path, head: str = "causal_lm", tmp_path: Path | None = None):
    """The trained model rebuilt from its parts: base + SFT adapter merged + the run's adapter."""
    start = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(raw_base(run_dir)), str(sft_dir / "final")).merge_and_unload()
    if head == "reward":  # the reward model's body is the merged policy; its score head comes with its adapter
        start.save_pretrained(tmp_path)
        start = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    return PeftModel.from_pretrained(start, str(run_dir / "final")).eval()


def outputs(model, batch, dtype=torch.float32) -> torch.Tensor:
    if dtype != torch.float32:  # (a 4-bit model refuses .to(dtype); it is only compared in float32)
        model = model.to(dtype)
    with torch.no_grad():
        logits = model(**batch).logits
    return logits[batch["attention_mask"].bool()] if logits.dim() == 3 else logits


def largest_gap(a, b, batch, dtype=torch.float32) -> float:
    return (outputs(a, batch, dtype) - outputs(b, batch, dtype)).abs().max().item()


@pytest.mark.slow
def test_dpo_final_loads_with_plain_peft_as_trained(dpo_chain):
    dpo = dpo_chain / "dpo"
    batch = sample_batch(dpo)
    trained = by_hand(dpo, dpo_chain / "sft")
    plain = AutoPeftModelForCausalLM.from_pretrained(dpo / "final").eval()
    assert largest_gap(trained, plain, batch) <= TOLERANCE
    # What adapter_config.json used to name, the raw base, drops the SFT stage: a different model.
    on_raw_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(raw_base(dpo)), str(dpo / "final")).eval()
    assert largest_gap(trained, on_raw_base, batch) > 1e-2
    lineage = json.loads((dpo / "final" / "lineage.json").read_text())
    assert [a["path"] for a in lineage["trained_on"]["adapters"]] == [str((dpo_chain / "sft" / "final").resolve())]
    assert all(len(a["sha256"]) == 64 for a in lineage["trained_on"]["adapters"])


def test_rm_and_ppo_finals_load_with_plain_peft_as_trained(rlhf_chain, tmp_path):
    chain, _ = rlhf_chain
    batch = sample_batch(chain / "ppo")
    ppo = AutoPeftModelForCausalLM.from_pretrained(chain / "ppo" / "final").eval()
    assert largest_gap(by_hand(chain / "ppo", chain / "sft"), ppo, batch) <= TOLERANCE
    rm = AutoPeftModelForSequenceClassification.from_pretrained(chain / "rm" / "final", num_labels=1).eval()
    assert largest_gap(by_hand(chain / "rm", chain / "sft", "reward", tmp_path), rm, batch) <= TOLERANCE


@pytest.mark.parametrize("step", ["dpo", "rm", "ppo"])
def test_export_is_a_standalone_model_with_the_trained_outputs(step, dpo_chain, rlhf_chain, tmp_path):
    chain = dpo_chain if step == "dpo" else rlhf_chain[0]
    head = "reward" if step == "rm" else "causal_lm"
    out = tmp_path / "exported"
    export(chain / step, out)
    auto = AutoModelForSequenceClassification if head == "reward" else AutoModelForCausalLM
    exported = auto.from_pretrained(out).eval()
    assert not (out / "adapter_config.json").exists() and (out / "chat_template.jinja").is_file()
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert not any("value_head" in name for name in exported.state_dict())
    batch = sample_batch(chain / step)
    # float64: the exported float32 weights against the trained parts, free of float32 matmul rounding
    assert largest_gap(by_hand(chain / step, chain / "sft", head, tmp_path / "body"), exported, batch, torch.float64) <= TOLERANCE


def test_adapter_export_folds_the_lineage_into_one_adapter(dpo_chain, tmp_path):
    out = tmp_path / "adapter"
    export(dpo_chain / "dpo", out, adapter_only=True)
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == raw_base(dpo_chain / "dpo")  # the untouched base, not a merged copy
    assert settings["r"] == 2 * 16  # SFT's and DPO's rank: the sum of both updates, exactly
    batch = sample_batch(dpo_chain / "dpo")
    single = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    assert largest_gap(by_hand(dpo_chain / "dpo", dpo_chain / "sft"), single, batch, torch.float64) <= TOLERANCE


def test_a_failed_export_check_leaves_nothing_and_a_used_directory_is_refused(dpo_chain, tmp_path):
    out = tmp_path / "strict"
    with pytest.raises(UserError, match="export check failed"):
        export(dpo_chain / "dpo", out, tolerance=0.0)
    assert not out.exists()
    (out / "x").mkdir(parents=True)
    with pytest.raises(UserError, match="not empty"):
        export(dpo_chain / "dpo", out)


def test_4bit_run_exports_full_precision_weights_with_its_outputs(dpo_chain, tmp_path):
    """QLoRA on top of the SFT run: the export is the dequantized base with the adapter merged,
    the model that was trained; its outputs equal the 4-bit model's."""
    pytest.importorskip("bitsandbytes", reason="the [quantization] extra is not installed")
    from omegaconf import OmegaConf

    from rlhf.lineage import Lineage, TrainedRun

    run_dir = tmp_path / "qlora"
    train(run_dir, "stage=sft", "quantization=4bit", "sft.max_steps=5", f"model.init_from={dpo_chain / 'sft'}")
    out = tmp_path / "exported"
    export(run_dir, out)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.dtype == torch.float32 and "quantization_config" not in json.loads((out / "config.json").read_text())
    run = TrainedRun.of(run_dir, "run", ("sft",))
    float32 = OmegaConf.create({"dtype": "float32"})
    in_4bit = run.load(float32, run.cfg.quantization).eval()  # as the project trained it
    # Built independently with peft: the dequantized bare base with the SFT adapter and the QLoRA
    # adapter both active (the project stacks the SFT adapter beside the 4-bit base, unmerged).
    bare_base = Lineage(run.start.base).load(float32, run.cfg.quantization).dequantize()
    dequantized = PeftModel.from_pretrained(bare_base, str(dpo_chain / "sft" / "final"), adapter_name="sft")
    dequantized.load_adapter(str(run_dir / "final"), adapter_name="qlora")
    dequantized.base_model.set_adapter(["sft", "qlora"])
    dequantized.eval()
    batch = sample_batch(run_dir)
    assert largest_gap(in_4bit, dequantized, batch) <= TOLERANCE  # bitsandbytes computes with the dequantized weights
    assert largest_gap(dequantized, exported, batch, torch.float64) <= TOLERANCE


def test_sample_prints_an_answer(dpo_chain, capsys):
    from rlhf.sample import main

    main([str(dpo_chain / "dpo"), "1+1等于几？", "--max-new-tokens", "16"])
    assert capsys.readouterr().out.strip()
    with pytest.raises(SystemExit) as exit_info:
        main([str(dpo_chain / "missing"), "hi"])
    assert exit_info.value.code == 2
