"""Every private attribute of a library the project touches, in one place.

Each entry says what the project needs and why no public mechanism gives it. When a supported
version moves one of them, `tests/test_compat.py` fails naming the attribute and the library
version, before any training test does.

- transformers' Trainer keeps the running loss total in `_total_loss_scalar` (steps up to the
  last log) and `_tr_loss` (steps since); a resumed Trainer restarts both at zero, and its
  train_loss then averages only the steps after the resume over all steps. The public log
  history holds the logged losses rounded to 4 digits, not the total: a resumed run would not
  report the same train_loss as an uninterrupted one.
- TRL's trainers count the tokens trained on (logged as `num_tokens`) in `_total_train_tokens`,
  also restarted at zero on resume.
- TRL's DPOTrainer computes the reference log-probs of a whole split in
  `_precompute_ref_logps(dataset, name, batch_size)`; `ReferenceLogpsHook` routes it to the
  project's cache. TRL 1.16's own cache is keyed by the dataset's fingerprint, which datasets
  built in memory (every format conversion here) get at random; the project's key covers the
  reference lineage, tokenizer, rows and truncation, and holds for in-memory data and sweeps.
- TRL's trainers average the values in `_metrics[mode][name]` into each log line; the KL-DPO
  loss adds its two parts there so they are logged beside TRL's own metrics, at TRL's cadence.
- transformers' Trainer moves a collated batch to the model's device (and dtype handling) in
  `_prepare_inputs`; the preference evaluation scores batches of the Trainer's own loader.
- TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`, behind every TRL stage's
  log-probs) scores only the labelled positions (the completions) where
  `trl.trainer.utils._use_triton(device)` holds, and every position (prompt and padding too)
  elsewhere, because an accelerator without Triton recompiles for each new count of positions.
  A CPU does not compile, so there the full scoring only wastes time: on SmolLM2 with DPO it
  was a third of each step. `score_labelled_positions_on_cpu` makes the CPU take the compact
  path; the log-probs are the same up to float rounding (the labelled positions are scored
  either way, in smaller products). No public setting chooses the path.
- Hydra parses train.py's command line with `hydra._internal.utils.get_args_parser`; the
  project reads the same flags with the same parser instead of a copy of Hydra's flag table.
- Hydra's composition errors are exceptions whose only account of what failed is their text
  ("Could not find 'stage/dpoo'", "Could not override 'dpo.betta'", ...);
  `hydra_override_error` reads it into (kind, key, option) for the project's one-line errors.
- TRL's GRPO and RLOO trainers sample through the policy's own `generate` (without vLLM) and
  mark neither end of sampling: `time_generate` wraps the method to time it.
- bitsandbytes' 4-bit layers take an AVX512-BF16 CPU path (`support_avx512bf16_for_cpu`) that
  repacks their weights during an inference forward, which breaks the next training step;
  `keep_4bit_cpu_training_working` turns the path off.
- accelerate's mixed precision wraps a prepared model's `forward` in autocast and keeps the
  original as `_original_forward`; `float32_forward` runs the original outside autocast for a
  block, where bfloat16's rounding would swamp what is computed (DPO's held-out log-ratios).
  Over bfloat16 weights it also has the output layer compute in float32 from the decoder's
  float32-upcast last hidden state: TRL's fused LM head reads `get_output_embeddings().weight`
  and computes in the hidden state's dtype, the plain head is called as a module.
- peft's LoRA layers add their update to the frozen layer's output in whatever dtype autocast
  left it: bfloat16 under the CPU preset's autocast, which rounds a small update away.
  `float32_adapter_sums` hooks each frozen layer (`LoraLayer.base_layer`) to return float32.
- A full disk reaches a run as an OSError from Python's own writes, but safetensors (Rust) and
  torch.save (C++) raise their own exception types whose only trace of it is the OS message in
  their text; `out_of_space` reads those texts.
"""

import contextlib
import errno
import logging
import re
import time
import warnings

# transformers 5 deprecated `PreTrainedModel.is_gradient_checkpointing`, which TRL 1.16 and peft
# still read on every trainer they build: a FutureWarning on each run that no setting of ours
# causes or can avoid. Ignored by its exact message, so that any other warning still shows.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# bitsandbytes (the [quantization] extra), imported by peft on every command, asks the `kernels`
# package for a hub kernel on CPUs with AVX512-BF16; offline, or with the hub kernel untrusted, both
# log a warning and bitsandbytes computes 4-bit layers with its own CPU code, which is what the
# project tests. (logger, the start of the message's text): dropped by that text only, so any
# other message of those loggers still shows.
QUIET_LOG_MESSAGES = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"),
)
for _logger, _text in QUIET_LOG_MESSAGES:
    logging.getLogger(_logger).addFilter(lambda record, text=_text: not str(record.msg).startswith(text))

# (object, attribute) pairs tests/test_compat.py checks on the installed versions.
PRIVATE_ATTRIBUTES = {
    "transformers.Trainer (instance, after train())": ("_total_loss_scalar", "_tr_loss"),
    "trl.SFTTrainer / RewardTrainer (instance)": ("_total_train_tokens",),
    "trl.DPOTrainer (method)": ("_precompute_ref_logps",),
    "trl.DPOTrainer (instance)": ("_metrics",),
    "transformers.Trainer (method)": ("_prepare_inputs",),
    "hydra._internal.utils (function)": ("get_args_parser",),
    "trl.trainer.utils (function)": ("_use_triton",),
}


def running_loss_total(trainer) -> float:
    """The sum of the training losses of every step the Trainer has run in this process."""
    return trainer._total_loss_scalar + trainer._tr_loss.item()


def logged_loss_total(trainer) -> float:
    """The sum of the training losses up to the Trainer's last log (what its train_loss divides)."""
    return trainer._total_loss_scalar


def trained_tokens(trainer) -> int:
    """TRL's count of tokens trained on (0 for a trainer that does not count them)."""
    return getattr(trainer, "_total_train_tokens", 0)


def restore_trained_tokens(trainer, count: int) -> None:
    """Continue TRL's token count from a checkpoint's instead of from zero."""
    if hasattr(trainer, "_total_train_tokens"):
        trainer._total_train_tokens = count


def log_metric(trainer, mode: str, name: str, value: float) -> None:
    """Add a value to what the TRL trainer averages into its next `mode` ("train"/"eval") log."""
    trainer._metrics[mode][name].append(value)


def prepare_inputs(trainer, batch):
    """A collated batch on the Trainer's device, as its own steps receive it."""
    return trainer._prepare_inputs(batch)


@contextlib.contextmanager
def float32_forward(model):
    """In the block, `model` computes outside any autocast, and without the autocast wrapper
    accelerate puts on the forward of a model it prepared for mixed precision (which would turn
    autocast back on inside): in its weights' dtype - float32 on the CPU preset. Over 16-bit
    weights (the GPU presets' LoRA runs) the decoder still computes in them, but its last hidden
    state and the output layer are float32 (`float32_output_layer`): the logits, and the
    log-probs taken from them, are not rounded to 8 significant bits."""
    import torch  # here, not at the top: train.py --help/--cfg import this module and must stay torch-free

    wrapped, original = model.__dict__.get("forward"), model.__dict__.get("_original_forward")
    if original is not None:
        model.forward = original
    try:
        with torch.autocast(model.device.type, enabled=False), float32_output_layer(model):
            yield model
    finally:
        if original is not None:
            model.forward = wrapped


def score_head_in_hidden_dtype(model) -> None:
    """Undo one cast of TRL's RewardTrainer over quantized weights: it turns every trainable weight
    into bfloat16 (QLoRA's recipe), but the score head, unlike LoRA's layers, does not cast its
    input, so it must stay in the dtype of the hidden states it reads. Reassigns `param.data`."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        hidden_dtype = model.get_input_embeddings().weight.dtype
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_" not in name:
                param.data = param.data.to(hidden_dtype)


def transformers_model(model):
    """The transformers model under any peft or DDP wrapper."""
    while hasattr(model, "module") or hasattr(model, "get_base_model"):
        model = model.module if hasattr(model, "module") else model.get_base_model()
    return model


@contextlib.contextmanager
def float32_output_layer(model):
    """For the block, a causal LM whose output layer is 16-bit computes its logits in float32: the
    decoder's last hidden state is upcast on its way out (a forward hook, which TRL's fused LM head
    reads too) and the output layer multiplies it by its weights upcast. Nothing changes for
    float32 weights, for a model without an output layer (a reward model) or for an output layer
    that is not a plain Linear (an adapted one keeps its own forward)."""
    import torch
    import torch.nn.functional as F

    inner = transformers_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.weight.dtype == torch.float32:
        yield
        return

    def upcast(module, inputs, output):  # for TRL's fused head, which reads the hidden state without calling the head
        if isinstance(output, tuple):
            return (output[0].float(), *output[1:])
        if torch.is_tensor(getattr(output, "last_hidden_state", None)):
            output.last_hidden_state = output.last_hidden_state.float()
        return output

    def float32_head(hidden):
        bias = head.bias.float() if head.bias is not None else None
        return F.linear(hidden.float(), head.weight.float(), bias)

    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    hooked = isinstance(decoder, torch.nn.Module) and decoder is not inner
    hook = decoder.register_forward_hook(upcast) if hooked else None
    previous = head.__dict__.get("forward")  # set when a float32_forward block on this model is open around this one
    head.forward = float32_head
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()
        if previous is None:
            del head.forward
        else:
            head.forward = previous


class ReferenceLogpsHook:
    """Mixed in before trl.DPOTrainer: TRL's whole-split reference log-prob pass calls
    `self.reference_logps(dataset, name, batch_size)`, which may call `trl_reference_logps`."""

    def _precompute_ref_logps(self, dataset, name, batch_size):
        return self.reference_logps(dataset, name, batch_size)

    def trl_reference_logps(self, dataset, name, batch_size):
        return super()._precompute_ref_logps(dataset, name, batch_size)

    extra_columns = ()  # dataset columns to keep although the model takes no such argument

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *(c for c in self.extra_columns if c not in self._signature_columns)]


def score_labelled_positions_on_cpu() -> None:
    """Make TRL's fused LM head score only the labelled positions on the CPU too (see above)."""
    import trl.trainer.utils as trl_utils

    compact_on = trl_utils._use_triton
    if getattr(compact_on, "cpu_included", False):  # already done in this process
        return

    def compact_on_cpu_too(device) -> bool:
        return device.type == "cpu" or compact_on(device)

    compact_on_cpu_too.cpu_included = True
    trl_utils._use_triton = compact_on_cpu_too


def hydra_arguments(argv: list):
    """train.py's command line as Hydra's own parser reads it (flags, config path, overrides)."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(argv)


HYDRA_OVERRIDE_ERRORS = (  # (kind, the text naming the key in Hydra 1.3's message)
    ("not_in_config", r"delete from config\. '([^']+)'"),  # ~key of a key the config lacks
    ("already_set", r"already at '([^']+)'"),  # +key of a key the config has
    ("unknown_key", r"override '([^']+)'"),  # key=value of a key the config lacks
)


def hydra_override_error(message: str) -> tuple | None:
    """What a Hydra composition error is about: ("no_option", group, option) for a config group
    without that option, (kind, key, None) for the kinds in HYDRA_OVERRIDE_ERRORS, or None."""
    found = re.search(r"Could not find '([^']+)/([^'/]+)'", message)
    if found:
        return "no_option", found.group(1), found.group(2)
    for kind, pattern in HYDRA_OVERRIDE_ERRORS:
        found = re.search(pattern, message)
        if found:
            return kind, found.group(1), None
    return None


OUT_OF_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull")  # the OS's words, in any wrapper's message


def out_of_space(err: BaseException) -> bool:
    """Whether `err` (or an error it was raised from) is a full disk or an exhausted quota."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(err) for text in OUT_OF_SPACE_TEXTS):
            return True
        err = err.__cause__ or err.__context__
    return False


def time_generate(model, record) -> None:
    """Call `record(seconds, prompt_length, sequences)` after every `model.generate` call: its
    wall time, the width of the (padded) prompt ids it was given and the ids it returned
    (prompt_length None when it was given no ids, e.g. embeddings)."""
    generate = model.generate

    def timed_generate(*positional, **keywords):
        start = time.perf_counter()
        output = generate(*positional, **keywords)
        prompts = keywords.get("input_ids", keywords.get("inputs", positional[0] if positional else None))
        width = prompts.shape[1] if hasattr(prompts, "shape") else None
        record(time.perf_counter() - start, width, getattr(output, "sequences", output))
        return output

    model.generate = timed_generate


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


def float32_adapter_sums(model, inputs=None) -> None:
    """Under bfloat16 autocast over float32 weights, have every LoRA layer add its adapter's output
    to the frozen layer's output in float32.

    Autocast rounds the frozen layer's output to bfloat16, and LoRA adds its (early in training,
    tiny) update to that rounded value: an update under half a bfloat16 step of the output is
    rounded back to the same value, every time, so the model computes with only part of its
    adapter (bench/results/history.md, "LoRA sums in float32", measures what that does to a held-out loss).
    Handed the frozen output in float32, LoRA's sum stays float32; where a later operation rounds
    it to bfloat16 again (attention, the next matrix product), the rounding no longer drops the
    update every time. The matrix products themselves stay in bfloat16.

    `load_model` makes this a forward pre-hook of every model it loads for a bfloat16-autocast run,
    so it runs before each forward pass, after whoever wrapped the model in an adapter (TRL while
    building its trainer, PPO, a saved adapter loaded for evaluation): no stage has to remember it.
    Layers already handled are skipped."""
    import torch
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        frozen = module.base_layer
        weight = getattr(frozen, "weight", None)  # float32 weights only: not bfloat16 presets, not 4-bit
        if weight is not None and weight.dtype == torch.float32 and not getattr(frozen, "float32_output", False):
            frozen.register_forward_hook(float32_output)
            frozen.float32_output = True  # once per layer


def float32_output(layer, inputs, output):
    import torch

    return output.float() if torch.is_tensor(output) and output.is_floating_point() else output
