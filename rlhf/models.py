"""Where models come from: the built-in tiny model, local directories and hub ids; plus the
tokenizer, quantization and LoRA settings that go with them.

Heavy libraries (torch, transformers, tokenizers) are imported inside the functions so that
composing a config (`train.py --cfg job`, `--help`) never pays for them.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from rlhf import model_sources
from rlhf.errors import UserError

BUILTIN_PREFIX = "builtin:"
BUILTIN_DATA = Path(__file__).parent / "data" / "builtin"

# The tiny model: a Qwen2-architecture causal LM small enough to train in seconds on a CPU.
# Changing anything here changes the cache key, so a new model is built.
TINY_SPEC = {
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "seed": 0,
    "pretrain_steps": 400,  # full-weight language modelling on the built-in texts
    "pretrain_batch_size": 32,
    "pretrain_learning_rate": 3e-3,
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen models use it. The {% generation %} markers let TRL's
# `assistant_only_loss` find the assistant tokens of a `messages` conversation.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def cache_dir() -> Path:
    """The project's cache: $RLHF_CACHE, else ~/.cache/rlhf."""
    return Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf")).expanduser()


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


def ensure_tiny_model() -> Path:
    """Build the tiny model and its tokenizer once, into the cache, and return its directory.

    The build is deterministic (fixed seed, tokenizer trained on the built-in data), so a cache
    wiped between two runs gives the same weights again.
    """
    data_files = sorted(BUILTIN_DATA.glob("*.jsonl"))
    key = hashlib.sha256(json.dumps(TINY_SPEC, sort_keys=True).encode() + CHAT_TEMPLATE.encode())
    for path in data_files:
        key.update(path.read_bytes())
    return build_once(cache_dir() / f"tiny-qwen-{key.hexdigest()[:12]}", lambda out: _build_tiny_model(out, data_files))


def build_once(target: Path, build) -> Path:
    """`target`, built by `build(directory)` unless an earlier run built it already. The build
    goes to a directory beside the target, renamed when complete: concurrent sweep jobs never
    see half a model, and the loser of a race uses the winner's."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build(staging)
        os.rename(staging, target)
    except OSError:
        if not (target / "config.json").exists():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build_tiny_model(out_dir: Path, data_files: list) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    # A byte-level BPE tokenizer trained on the built-in data: it encodes any text (bytes
    # fall back to single tokens) and keeps frequent Chinese characters as one token.
    texts = []
    for path in data_files:
        for line in path.read_text(encoding="utf-8").splitlines():
            texts.extend(str(value) for value in json.loads(line).values())
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_SPEC["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=TINY_SPEC["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)

    spec = {k: v for k, v in TINY_SPEC.items() if k != "seed" and not k.startswith("pretrain")}
    config = Qwen2Config(
        **{**spec, "vocab_size": len(tokenizer)},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(TINY_SPEC["seed"])
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    _pretrain(model, tokenizer, texts)
    model.save_pretrained(out_dir)


def _pretrain(model, tokenizer, texts: list) -> None:
    """A short language-modelling pass over the built-in texts (each field as a plain document,
    no chat template), so the tiny model starts like a small pretrained base model: it knows
    the words and both the polite and the terse answers, but not yet the chat format. LoRA on
    a randomly initialised model would barely move; on this base it learns within a minute."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same floating-point sums on every machine: same weights
    try:
        generator = torch.Generator().manual_seed(TINY_SPEC["seed"])
        documents = [tokenizer(text + tokenizer.eos_token)["input_ids"][:64] for text in texts]
        optimizer = torch.optim.AdamW(model.parameters(), lr=TINY_SPEC["pretrain_learning_rate"])
        steps = TINY_SPEC["pretrain_steps"]
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
        model.train()
        for _ in range(steps):
            picks = torch.randint(len(documents), (TINY_SPEC["pretrain_batch_size"],), generator=generator)
            batch = [documents[i] for i in picks.tolist()]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            labels = torch.full((len(batch), width), -100)  # padding does not count in the loss
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                labels[row, : len(ids)] = torch.tensor(ids)
            loss = model(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        model.eval()
    finally:
        torch.set_num_threads(threads)


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


def load_model(model_path: str, model_cfg, quantization_cfg, hardware_cfg, head: str = "causal_lm"):
    """The model in `model_path`, in the hardware's dtype, quantized if asked (`rlhf.lineage`
    decides which directory: a base model, or one with earlier runs' adapters merged in).

    head="causal_lm" is a policy; head="reward" a sequence classifier with one output (a
    reward model; its score head starts untrained unless an adapter brings one).
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
    }
    if head == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, **kwargs)
        if model.config.pad_token_id is None:  # the score is read at the last non-pad token
            model.config.pad_token_id = model.config.eos_token_id
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
