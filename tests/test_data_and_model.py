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


def test_tiny_model_is_cached_and_its_template_marks_assistant_tokens():
    from transformers import AutoTokenizer

    from rlhf.models import ensure_tiny_model

    path = ensure_tiny_model()
    assert ensure_tiny_model() == path  # built once, then found in the cache
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert "{% generation %}" in tokenizer.chat_template
    chat = [{"role": "user", "content": "猫的英文是什么？"}, {"role": "assistant", "content": "cat"}]
    encoded = tokenizer.apply_chat_template(chat, return_assistant_tokens_mask=True, return_dict=True)
    marked = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert tokenizer.decode(marked) == "cat<|im_end|>"
