"""Loading models: where `model.name_or_path` points (a built-in model, a local directory, a hub
id), the tokenizer, the model in the hardware's dtype and quantization, adapters merged into it,
and the LoRA settings. The tiny model's builder is `rlhf.tiny_model`; hub access and SmolLM2's
conversion are `rlhf.model_sources`.

Heavy libraries (torch, transformers, tokenizers) are imported inside the functions so that
composing a config (`train.py --cfg job`, `--help`) never pays for them.
"""

from pathlib import Path

from rlhf import model_sources
from rlhf.errors import UserError
from rlhf.tiny_model import ensure_tiny_model

BUILTIN_PREFIX = "builtin:"


def resolve_model_path(model_cfg) -> str:
    """A local directory holding the model named by `model.name_or_path`.

    `builtin:<name>` is built (once) into the cache; an existing local path is used as it is;
    anything else is a hub id, fetched from `model.hub` or found in that hub's local cache.
    """
    hub = model_sources.check_hub(model_cfg.get("hub"))  # a typo fails even when no hub is asked
    name = str(model_cfg.name_or_path)
    if name.startswith(BUILTIN_PREFIX):
        builders = {"tiny": ensure_tiny_model, "smollm2-135m": model_sources.ensure_smollm2}
        builtin = name[len(BUILTIN_PREFIX) :]
        if builtin not in builders:
            valid = ", ".join(BUILTIN_PREFIX + key for key in builders)
            raise UserError(f"model.name_or_path={name}: unknown built-in model; valid ones: {valid}")
        return str(builders[builtin]())
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local)
    if local.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise UserError(f"model.name_or_path={name}: no such directory")
    return model_sources.download(name, hub, model_cfg.get("revision"))


def load_tokenizer(model_path: str, model_cfg):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=bool(model_cfg.trust_remote_code))
    if tokenizer.pad_token is None:  # many causal LMs ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise UserError(
            f"model.name_or_path={model_cfg.name_or_path}: the tokenizer has no chat template; "
            "use an instruct/chat model or a tokenizer directory that defines one"
        )
    return tokenizer


def load_model(model_path: str, model_cfg, quantization_cfg, hardware_cfg, head: str = "causal_lm", pad_token_id: int | None = None):
    """The model in `model_path`, in the hardware's dtype, quantized if asked (`rlhf.lineage`
    decides which directory: a base model, or one with earlier runs' adapters merged in).

    head="causal_lm" is a policy; head="reward" a sequence classifier with one output (a
    reward model; its score head starts untrained unless an adapter brings one), whose config
    gets `pad_token_id`, the id its tokenizer pads with (required for head="reward").
    """
    import torch
    from hydra.utils import instantiate
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quantization = instantiate(quantization_cfg) if quantization_cfg is not None else None
    kwargs = {
        "use_safetensors": True,  # never unpickle weights: a .bin checkpoint can run code when loaded
        "dtype": getattr(torch, hardware_cfg.dtype),
        "trust_remote_code": bool(model_cfg.trust_remote_code),
        "quantization_config": quantization,
        "attn_implementation": model_cfg.get("attn_implementation") or None,
        # transformers 5 swaps in hub kernels on CUDA whenever the `kernels` package is installed
        # (trl requires it), fetching them from the hub at load: offline, every GPU run failed there.
        "use_kernels": bool(model_cfg.get("use_kernels", False)),
    }
    if head == "reward":
        if pad_token_id is None:
            raise ValueError("a reward model needs its tokenizer's pad_token_id")
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, **kwargs)
        # transformers' classifier reads the score at the last token that is not config.pad_token_id:
        # it must be the id the tokenizer pads with. Qwen2.5/Qwen3 configs have none, and their EOS
        # (<|im_end|>) is not their pad token (<|endoftext|>): with EOS as pad id, every shorter row of
        # a right-padded batch would be scored on a padding token.
        model.config.pad_token_id = pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_cpu_training_working(model)
    return model


def keep_4bit_cpu_training_working(model) -> None:
    """bitsandbytes' AVX512-BF16 CPU path for 4-bit layers repacks the weights during an
    inference forward (evaluation), after which the next training step fails ("a view of a
    leaf Variable ... in-place operation"). Switching that path off on every 4-bit layer keeps
    4-bit training with evaluation working on such CPUs; GPUs never take that path."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def merge_adapter(model, adapter_dir):
    """Fold a saved LoRA adapter into the model's weights (its score head, if it saved one,
    replaces the model's). A policy's adapter also merges into a reward model built on the
    same base: only the shared transformer layers carry LoRA weights."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(str(adapter_dir))
    if config.task_type == "CAUSAL_LM" and not hasattr(model, "prepare_inputs_for_generation"):
        config.task_type = None  # a plain PeftModel: no generation hooks on a classifier
    return PeftModel.from_pretrained(model, str(adapter_dir), config=config).merge_and_unload()


def lora_config(r: int, alpha: float, dropout: float, target_modules, bias: str = "none", task_type: str = "CAUSAL_LM"):
    """peft's LoraConfig under the project's short key names (`peft.alpha`, `peft.dropout`)."""
    from peft import LoraConfig

    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias=bias, task_type=task_type)
