"""The built-in data and tiny model: formats convert, bad rows are named by file and line,
and the tiny tokenizer's chat template marks the assistant tokens."""

import json

import pytest
from omegaconf import OmegaConf

from rlhf.data import load_splits
from rlhf.errors import UserError


def dataset_cfg(path, fmt, **extra):
    return OmegaConf.create({"format": fmt, "path": str(path), "max_samples": None, "test_size": 0, "seed": 0, **extra})


def test_builtin_datasets_split_into_conversations():
    splits = load_splits(dataset_cfg("builtin:sft_zh.jsonl", "belle", test_size=0.1), kind="sft")
    assert len(splits.train) == 540 and len(splits.eval) == 60 and splits.skipped_rows == 0
    first = splits.train[0]
    assert first["prompt"][0]["role"] == "user" and first["completion"][0]["role"] == "assistant"
    pairs = load_splits(dataset_cfg("builtin:preference_zh.jsonl", "preference"), kind="preference").train
    assert len(pairs) == 600 and all(row["chosen"] != row["rejected"] for row in pairs)
    prompts = {row["prompt"][0]["content"] for row in pairs}
    assert len(prompts) == 600  # every prompt distinct, so the held-out split measures something


def test_belle_joins_a_nonempty_input_to_the_instruction(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "翻译", "input": "cat", "output": "猫"}) + "\n")
    train = load_splits(dataset_cfg(path, "belle"), kind="sft").train
    assert train[0]["prompt"][0]["content"] == "翻译\ncat"


@pytest.mark.parametrize(
    "line, reason",
    [
        ("{not json", "line 2: not valid JSON"),
        ('{"instruction": "x", "input": ""}', "line 2: field 'output' is missing"),
        ('{"instruction": "x", "input": "", "output": null}', "line 2: field 'output' is null"),
        ('{"instruction": "x", "input": "", "output": "  "}', "line 2: field 'output' is empty"),
        ('{"instruction": 3, "input": "", "output": "y"}', "line 2: field 'instruction' should be a string, got int"),
    ],
)
def test_a_bad_row_is_named_by_file_and_line(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n" + line + "\n")
    with pytest.raises(UserError) as err:
        load_splits(dataset_cfg(path, "belle"), kind="sft")
    assert str(path) in str(err.value) and reason in str(err.value)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        load_splits(dataset_cfg(tmp_path / "nope.jsonl", "belle"), kind="sft")
    with pytest.raises(UserError, match="valid formats"):
        load_splits(dataset_cfg("builtin:sft_zh.jsonl", "nope"), kind="sft")


@pytest.mark.slow
def test_tiny_model_is_cached_and_its_template_marks_assistant_tokens():
    from transformers import AutoTokenizer

    from rlhf.tiny_model import ensure_tiny_model

    path = ensure_tiny_model()
    assert ensure_tiny_model() == path  # built once, then found in the cache
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert "{% generation %}" in tokenizer.chat_template
    chat = [{"role": "user", "content": "猫的英文是什么？"}, {"role": "assistant", "content": "cat"}]
    encoded = tokenizer.apply_chat_template(chat, return_assistant_tokens_mask=True, return_dict=True)
    marked = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert tokenizer.decode(marked) == "cat<|im_end|>"


@pytest.fixture(scope="module")
def qwen3_model_dir(tmp_path_factory):
    """A one-layer random Qwen3 model with the real Qwen3 tokenizer from ../shared/data."""
    from conftest import SHARED_DATA
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    source = SHARED_DATA / "tokenizers" / "qwen3"
    if not source.exists():
        pytest.skip(f"{source} is absent (the real tokenizer lives in ../shared/data beside the checkout)")
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        eos_token_id=tokenizer.eos_token_id,
    )
    target = tmp_path_factory.mktemp("qwen3-tiny")
    Qwen3ForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def first_tokenized_row(model_dir, tmp_path, trainer_class, config_class, path, fmt, kind):
    """(tokenizer, the trainer's first tokenized row, the record it came from) for 4 rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_splits(dataset_cfg(path, fmt, max_samples=4), kind=kind).train
    args = config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_length=128)
    trainer = trainer_class(
        model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=data, processing_class=tokenizer
    )
    return tokenizer, trainer.train_dataset[0], data[0]


def test_qwen3_sft_formatting_counts_only_assistant_tokens(qwen3_model_dir, tmp_path):
    from trl import SFTConfig, SFTTrainer

    tokenizer, row, source = first_tokenized_row(qwen3_model_dir, tmp_path, SFTTrainer, SFTConfig, "builtin:sft_zh.jsonl", "belle", "sft")
    whole = tokenizer.apply_chat_template(source["prompt"] + source["completion"], tokenize=False)
    assert tokenizer.decode(row["input_ids"]) == whole  # the Qwen3 chat template, applied once
    assert whole.startswith("<|im_start|>user\n" + source["prompt"][0]["content"] + "<|im_end|>")
    trained = tokenizer.decode([t for t in row["labels"] if t != -100])
    assert trained == "<think>\n\n</think>\n\n" + source["completion"][0]["content"] + "<|im_end|>\n"


def test_qwen3_dpo_formatting_splits_prompt_and_answers(qwen3_model_dir, tmp_path):
    from trl import DPOConfig, DPOTrainer

    tokenizer, row, source = first_tokenized_row(
        qwen3_model_dir, tmp_path, DPOTrainer, DPOConfig, "builtin:preference_zh.jsonl", "preference", "preference"
    )
    assert tokenizer.decode(row["prompt_ids"]) == tokenizer.apply_chat_template(
        source["prompt"], tokenize=False, add_generation_prompt=True
    )
    for answer in ("chosen", "rejected"):
        assert tokenizer.decode(row[f"{answer}_ids"]).endswith(source[answer][0]["content"] + "<|im_end|>\n")


@pytest.mark.slow
def test_a_local_model_directory_trains_through_the_cli_config(qwen3_model_dir, tmp_path):
    from conftest import train

    metrics = train(
        tmp_path, "stage=sft", "model=custom", f"model.name_or_path={qwen3_model_dir}", "sft.max_steps=2", "dataset.max_samples=24"
    )
    assert metrics["train_loss"] > 0


def test_a_local_model_directory_is_checked_for_config_tokenizer_and_weights(tmp_path):
    """Each missing part is named in one line before any library reads the directory."""
    from rlhf.errors import UserError
    from rlhf.models import check_model_directory

    for write, missing in (
        (None, "has no config.json"),
        ("config.json", "has no tokenizer files"),
        ("tokenizer.json", r"has no \*\.safetensors weights"),
    ):
        if write:
            (tmp_path / write).write_text("{}")
        with pytest.raises(UserError, match=missing):
            check_model_directory(tmp_path, str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    check_model_directory(tmp_path, str(tmp_path))  # all three parts: accepted


def test_a_required_model_path_is_not_required_when_a_run_names_the_base():
    from conftest import compose_config

    from rlhf.errors import UserError
    from rlhf.validate import check_required

    with pytest.raises(UserError, match="model.name_or_path is required"):
        check_required(compose_config("model=custom"))
    check_required(compose_config("model=custom", "model.init_from=outputs/x/sft"))  # the run's lineage names its base
