"""RLHF experiments on transformers + trl + peft, configured by Hydra (see README.md)."""

import os
import time
from importlib import metadata
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BUILTIN_PREFIX = "builtin:"  # a name of the project's own: builtin:tiny (a model), builtin:sft_zh.jsonl (a dataset)

# `${project_root:}` lets conf/config.yaml put the top-level sweeps/ folder on Hydra's search
# path wherever the command is started from.
OmegaConf.register_new_resolver("project_root", lambda: PROJECT_ROOT.as_posix(), replace=True)


def launch_stamp() -> str:
    """The run directory's last part: the launch time, or under torchrun / accelerate launch
    the launch's run id, so that every rank of one launch agrees on one run directory (each
    rank composes its own config, and their clocks can straddle a second)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"distributed-{run_id[:12]}"
    return time.strftime("%H-%M-%S")


def if_cuda(on_gpu, otherwise):
    """`${if_cuda:A,B}`: A on a machine with a CUDA GPU, else B (resolved only when a run
    starts, so composing a config never imports torch)."""
    import torch

    return on_gpu if torch.cuda.is_available() else otherwise


def ddp_backend():
    """`${ddp_backend:}`: nccl between GPUs, gloo between CPU processes of a launch, and none
    for a single process (setting one there makes TrainingArguments expect a process group)."""
    import torch

    if torch.cuda.is_available():
        return "nccl"
    return "gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def cpu_bf16(pays: bool = True) -> bool:
    """`${cpu_bf16:${model.cpu_bf16}}`: True on a CPU with bfloat16 matrix units (AVX512-BF16 or
    AMX, read from /proc/cpuinfo), where bfloat16 autocast trains real models faster, if the
    model's config says autocast pays for it (the tiny model's matrices are too small); else False."""
    if isinstance(pays, str):  # a config saved before model.cpu_bf16 passes its model's name: the tiny model was the exception
        pays = pays != "builtin:tiny"
    if pays is not True:
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="ignore").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def weights_dtype(dtype: str, _root_=None) -> str:
    """`${weights_dtype:bfloat16}` (the GPU presets' `hardware.dtype`): `dtype` for a run whose
    trained weights are LoRA adapters (the frozen base, references and reward models load in it),
    float32 for a run that trains every weight (peft=none, no quantization). AdamW adds updates of
    about learning_rate x |w| to each weight; in bfloat16 (8 significant bits) an update under half
    a step of its weight rounds away, so a full fine-tune at 1e-6 kept almost none of its update.
    Float32 master weights under bfloat16 autocast keep them; the matrix products stay bfloat16."""
    trains_every_weight = _root_ is not None and _root_.get("peft") is None and _root_.get("quantization") is None
    return "float32" if trains_every_weight else dtype


def bf16_autocast(hardware_cfg) -> bool:
    """Whether a run computes under bfloat16 autocast: `hardware.training_args.bf16` (on the CPU
    preset: where the CPU has bfloat16 matrix units and the model's `cpu_bf16` is true). The one
    place that reads it: the Trainer stages, the own loops (`RunContext.autocast`), the models
    loaded for the run and the precision label all follow this answer."""
    return bool(OmegaConf.select(hardware_cfg, "training_args.bf16", default=False))


def precision(cfg) -> str:
    """How the run computes: the weights' dtype, and whether under bfloat16 autocast."""
    return f"{cfg.hardware.dtype} weights" + (", bfloat16 autocast" if bf16_autocast(cfg.hardware) else "")


# Cached like Hydra's own `now`: a sweep's jobs compose their configs one after another (Hydra
# copies the launch's resolver cache into each), so every job, and the summary after them,
# resolves the one directory of the launch instead of a time of its own.
OmegaConf.register_new_resolver("launch_stamp", launch_stamp, use_cache=True, replace=True)
OmegaConf.register_new_resolver("cpu_bf16", cpu_bf16, replace=True)
OmegaConf.register_new_resolver("weights_dtype", weights_dtype, replace=True)
OmegaConf.register_new_resolver("mul", lambda a, b: a * b, replace=True)  # `${mul:16,4}`: a budget's answers per update
OmegaConf.register_new_resolver("ddp_backend", ddp_backend, replace=True)
OmegaConf.register_new_resolver("if_cuda", if_cuda, replace=True)


def package_versions(names) -> dict:
    """Installed version of each package (None when it is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
