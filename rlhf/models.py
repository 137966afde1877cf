"""Loading models: where `model.name_or_path` points (a built-in model, a local directory, a hub
id), the tokenizer, the model in the hardware's dtype and quantization, adapters merged into it,
and the LoRA settings. The tiny model's builder is `rlhf.tiny_model`; hub access and SmolLM2's
conversion are `rlhf.model_sources`.

Heavy libraries (torch, transformers, tokenizers) are imported inside the functions so that
composing a config (`train.py --cfg job`, `--help`) never pays for them.
"""

import json
import math
from pathlib import Path

from rlhf import BUILTIN_PREFIX, bf16_autocast, model_sources
from rlhf.compat import float32_adapter_sums, keep_4bit_cpu_training_working
from rlhf.errors import UserError
from rlhf.tiny_model import ensure_tiny_model

# `builtin:<name>` models: name -> the function that builds it into the cache (once) and returns its directory
BUILTIN_MODELS = {"tiny": ensure_tiny_model, "smollm2-135m": model_sources.ensure_smollm2}


def resolve_model_path(model_cfg) -> str:
    """A local directory holding the model named by `model.name_or_path`.

    `builtin:<name>` is built (once) into the cache; an existing local path is used as it is;
    anything else is a hub id, fetched from `model.hub` or found in that hub's local cache.
    """
    hub = model_sources.check_hub(model_cfg.get("hub"))  # a typo fails even when no hub is asked
    name = str(model_cfg.name_or_path)
    if name.startswith(BUILTIN_PREFIX):
        builtin = name[len(BUILTIN_PREFIX) :]
        if builtin not in BUILTIN_MODELS:
            valid = ", ".join(BUILTIN_PREFIX + key for key in BUILTIN_MODELS)
            raise UserError(f"model.name_or_path={name}: unknown built-in model; valid ones: {valid}")
        return str(BUILTIN_MODELS[builtin]())
    local = Path(name).expanduser()
    if local.is_dir():
        check_model_directory(local, name)
        return str(local)
    if local.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise UserError(f"model.name_or_path={name}: no such directory")
    return model_sources.download(name, hub, model_cfg.get("revision"))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")  # any one: a tokenizer saved there


def check_model_directory(local: Path, name: str) -> None:
    """A local model directory holds a transformers model: its config.json and a tokenizer."""
    if not (local / "config.json").is_file():
        raise UserError(f"model.name_or_path={name}: {local} has no config.json; point it at a transformers model directory")
    if not any((local / file).is_file() for file in TOKENIZER_FILES):
        raise UserError(f"model.name_or_path={name}: {local} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    if not any(local.glob("*.safetensors")):  # load_model reads safetensors only (no pickled .bin weights)
        raise UserError(f"model.name_or_path={name}: {local} has no *.safetensors weights (pickled .bin checkpoints are not loaded)")


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
    if bf16_autocast(hardware_cfg):
        model.register_forward_pre_hook(float32_adapter_sums)  # whoever adds LoRA layers later, and whenever
    return model


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


def merging_is_exact(hardware_cfg, quantization_cfg) -> bool:
    """Whether folding earlier runs' LoRA updates into the weights gives the model they trained
    as: float32 weights computed in float32. In bfloat16 - as weights, or under autocast, where
    every matrix product rounds its weights to bfloat16 - an update smaller than half a step of
    the weight it is added to rounds away (most of a 1e-5-sized update); quantizing the merged
    weights moves them by far more than a LoRA update. There the updates are stacked instead."""
    return str(hardware_cfg.dtype) == "float32" and not bf16_autocast(hardware_cfg) and quantization_cfg is None


def stack_adapters(model, adapter_dirs, head: str = "causal_lm") -> None:
    """Apply saved LoRA adapters beside the model's frozen layers instead of folding them in: each
    targeted layer adds x A^T B^T (the adapters' matrices, in their saved float32, concatenated
    along the rank) to its output, as LoRA computed it while those runs trained. Nothing is
    trainable or saved: a new adapter put on top sees a plain layer whose output includes the
    earlier updates, and with that adapter disabled the model is the earlier run's policy."""
    from safetensors.torch import load_file

    modules = dict(model.named_modules())
    for adapter_dir in adapter_dirs:
        settings = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        unsupported = [
            name
            for name, used in (
                (f"peft_type={settings.get('peft_type')}", settings.get("peft_type") != "LORA"),
                ("use_dora", settings.get("use_dora")),
                ("rank_pattern", settings.get("rank_pattern")),
                ("alpha_pattern", settings.get("alpha_pattern")),
            )
            if used
        ]
        if unsupported:
            raise UserError(
                f"{adapter_dir}: an adapter with {', '.join(unsupported)} cannot be stacked under a new one; retrain it as plain LoRA"
            )
        rank = settings["r"]
        scaling = settings["lora_alpha"] / (math.sqrt(rank) if settings.get("use_rslora") else rank)
        weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
        for key, tensor in weights.items():
            name = key.removeprefix("base_model.model.")
            if key.endswith(".lora_B.weight"):
                continue  # read with its lora_A
            if key.endswith(".lora_A.weight"):
                owner = name.removesuffix(".lora_A.weight")
                update = (tensor, weights[key.replace(".lora_A.weight", ".lora_B.weight")] * scaling)
            elif key.endswith(".bias"):  # peft.bias=all/lora_only: the run trained these biases
                owner, update = name.removesuffix(".bias"), None
            else:
                raise UserError(f"{adapter_dir}: cannot stack {key} (only LoRA matrices of linear layers and biases)")
            module = modules.get(owner)
            if module is None:
                if head == "reward" and owner == "lm_head":  # a policy's output layer: a classifier has none
                    continue
                raise UserError(f"{adapter_dir}: it adapts {owner}, which model {type(model).__name__} does not have")
            if update is None:
                module.bias.data.copy_(tensor)
            else:
                add_stacked_update(module, *update)


def add_stacked_update(module, lora_a, lora_b) -> None:
    """Give `module` the frozen low-rank update lora_b @ lora_a (scaling folded into lora_b)."""
    import torch

    device = module.weight.device
    if hasattr(module, "stacked_lora_a"):  # a second stacked adapter on this layer: one concatenated rank
        lora_a = torch.cat([module.stacked_lora_a, lora_a.to(device)])
        lora_b = torch.cat([module.stacked_lora_b, lora_b.to(device)], dim=1)
    else:
        module.stacked_update_hook = module.register_forward_hook(stacked_update_output)  # its handle removes it
    module.register_buffer("stacked_lora_a", lora_a.float().to(device), persistent=False)
    module.register_buffer("stacked_lora_b", lora_b.float().to(device), persistent=False)


def stacked_update_output(module, inputs, output):
    """The layer's output plus its stacked update, added as peft added those adapters' outputs
    while their runs trained: in float32, kept in float32 where the layer's weights are float32
    (LoRA's sum under autocast, `float32_adapter_sums`), else rounded back to the
    output's dtype."""
    import torch
    import torch.nn.functional as F

    x = inputs[0].to(module.stacked_lora_a.dtype)
    update = F.linear(F.linear(x, module.stacked_lora_a), module.stacked_lora_b)
    total = output.float() + update.float()
    return total if module.weight.dtype == torch.float32 else total.to(output.dtype)


def fold_stacked_updates(model) -> None:
    """Fold every stacked update into its layer's weights (in their dtype) and remove it: for
    saving a whole model, or exporting (in float64, where the fold loses nothing)."""
    for module in model.modules():
        if hasattr(module, "stacked_lora_a"):
            weight = module.weight
            weight.data += (module.stacked_lora_b.to(weight.dtype) @ module.stacked_lora_a.to(weight.dtype)).to(weight.device)
            module.stacked_update_hook.remove()
            del module.stacked_lora_a, module.stacked_lora_b, module.stacked_update_hook
