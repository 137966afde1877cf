"""The built-in tiny model (`model.name_or_path=builtin:tiny`): a Qwen2-architecture causal LM
with a byte-level BPE tokenizer trained on the built-in data, briefly pretrained so that LoRA
learns on it within a minute on a CPU. Built once, deterministically, into the cache.
"""

import hashlib
import json
from pathlib import Path

from rlhf.cache import build_once, cache_dir

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
