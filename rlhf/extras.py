"""The optional parts of the project and the pyproject extra that installs each, so that a choice
whose package is missing stops in one line naming the extra, before anything runs.

A plain install (`pip install -e .`) runs every stage on the CPU, with W&B as its tracker. The
rest comes with an extra: a choice on the command line (a launcher, a sweeper, a logger, a
quantization) names what it needs here, and `check_installed(cfg)` stops at the first one absent.
(`model.hub=modelscope` is checked where the hub is asked, rlhf.model_sources: a built-in or local
model never asks it.)
Hydra's own plugin configs (the Optuna sweeper, the joblib and submitit launchers) do not even
compose without their package: `plugin_extra(message)` reads Hydra's composition error instead.

Checking uses `importlib.util.find_spec`, which imports nothing: composing stays torch-free.
"""

import importlib.util
import re
from dataclasses import dataclass

from omegaconf import OmegaConf

from rlhf.errors import UserError


@dataclass(frozen=True)
class Extra:
    name: str  # the extra in pyproject.toml's [project.optional-dependencies]
    module: str  # a module the extra installs: present when find_spec finds it


# Hydra plugin configs (group/option) that exist only when their plugin package is installed.
PLUGIN_CONFIGS = {
    "hydra/sweeper/optuna": Extra("sweeps", "hydra_plugins.hydra_optuna_sweeper"),
    "hydra/launcher/joblib": Extra("cluster", "hydra_plugins.hydra_joblib_launcher"),
    "hydra/launcher/submitit_local": Extra("cluster", "hydra_plugins.hydra_submitit_launcher"),
    "hydra/launcher/submitit_slurm": Extra("cluster", "hydra_plugins.hydra_submitit_launcher"),
}
GPU_POOL = "hydra_plugins.rlhf_gpu_pool.gpu_pool_launcher.GPUPoolLauncher"
TENSORBOARD = Extra("tensorboard", "tensorboard")
QUANTIZATION = Extra("quantization", "bitsandbytes")
CLUSTER = Extra("cluster", "cloudpickle")  # the gpu_pool launcher pickles train.py's task with it
VLLM = Extra("vllm", "vllm")
MODELSCOPE = Extra("modelscope", "modelscope")


def install_command(extra: str) -> str:
    return f'pip install -e ".[{extra}]"'


def installed(extra: Extra) -> bool:
    try:
        return importlib.util.find_spec(extra.module) is not None
    except ModuleNotFoundError:  # a parent package (hydra_plugins.x) is absent
        return False


def needs(choice: str, extra: Extra) -> str:
    """The one line for a choice whose extra is missing."""
    return f"{choice} needs the [{extra.name}] extra, which is not installed: {install_command(extra.name)}"


def check_installed(cfg) -> None:
    """A UserError naming the extra of the first choice in the composed config whose package is
    not installed. Hydra's node (the launcher) is checked where the config carries it."""
    choices = [
        ("logger=tensorboard", TENSORBOARD, OmegaConf.select(cfg, "logger.report_to") == "tensorboard"),
        (quantization_choice(cfg), QUANTIZATION, bool(OmegaConf.select(cfg, "quantization._target_"))),
        ("hydra/launcher=gpu_pool", CLUSTER, OmegaConf.select(cfg, "hydra.launcher._target_") == GPU_POOL),
    ]
    for choice, extra, chosen in choices:
        if chosen and not installed(extra):
            raise UserError(needs(choice, extra))


def quantization_choice(cfg) -> str:
    bits = 4 if OmegaConf.select(cfg, "quantization.load_in_4bit") else 8
    return f"quantization={bits}bit"


def plugin_extra(message: str) -> str | None:
    """For Hydra's composition error about a plugin config that is not installed (`Could not find
    'hydra/sweeper/optuna'`, `Could not load 'hydra/launcher/submitit_slurm'`), the one line
    naming the extra; None for any other error. A config file that chose the plugin config
    (`hydra/launcher=slurm_multi_gpu` chooses submitit_slurm) is named too."""
    for config, extra in PLUGIN_CONFIGS.items():
        if f"'{config}'" in message and not installed(extra):
            group, option = config.rsplit("/", 1)
            asked_by = re.search(r"In '((?!hydra/config')[^']+/[^']+)'", message)  # a config file that chose it, not the root
            choice = f"{group}={option}" + (" (chosen by {}={})".format(*asked_by.group(1).rsplit("/", 1)) if asked_by else "")
            return needs(choice, extra)
    return None
