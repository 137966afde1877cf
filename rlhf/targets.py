"""Which `_target_`s a config may name. Hydra instantiates whatever a config's `_target_` names,
so a config someone hands you - a shared experiment, a saved run - could run any code: only
objects of the project's modules and its libraries' (ALLOWED_TARGETS), and of the modules the
command's environment allows (`RLHF_ALLOW_TARGETS`), are built. A name is checked by what it
resolves to, not by its spelling: `rlhf.command.subprocess.run` is subprocess.run.
"""

from __future__ import annotations

import functools
import os
import re
import types

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from rlhf import PROJECT_ROOT
from rlhf.errors import UserError, first_line

ALLOWED_TARGETS = ("rlhf.", "trl.", "peft.", "transformers.", "torch.optim.", "hydra_plugins.")
# Hydra's own settings (the `hydra` node) also name Hydra's core plugins and the Optuna sampler.
HYDRA_NODE_TARGETS = ("hydra._internal.core_plugins.", "optuna.samplers.")


def check_targets(cfg) -> None:
    """Every `_target_` anywhere (lists included) names something under an allowed prefix and,
    unless the project's own config files use it, resolves to an object of an allowed module."""
    raw = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    for path, target in _targets(raw, ""):
        if isinstance(target, str) and "${" in target:  # an interpolation: check what it becomes
            try:
                target = OmegaConf.select(cfg, path, throw_on_resolution_failure=True)
            except Exception as err:
                raise UserError(f"refusing _target_={target} at {path}: cannot resolve it ({first_line(err)})") from None
        check_target(target, path, resolve=target not in shipped_targets())


USER_TARGETS_VARIABLE = "RLHF_ALLOW_TARGETS"  # the opt-in for a user's own modules (docs/layout.md, "How to add")


def user_allowed_targets() -> tuple:
    """The module prefixes the user allows besides the project's and its libraries'
    (`RLHF_ALLOW_TARGETS=mypkg.rewards.,other.`): set in the environment of the command, so that a
    config file - a shared experiment, a saved run - can name a target but never allow one."""
    value = os.environ.get(USER_TARGETS_VARIABLE, "")
    prefixes = tuple(part.strip() for part in value.split(",") if part.strip())
    for prefix in prefixes:
        if not re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*\.)+", prefix):
            raise UserError(f"{USER_TARGETS_VARIABLE}={value}: '{prefix}' is not a module prefix ending in '.' (e.g. mypkg.rewards.)")
    return prefixes


def check_target(target, path: str, resolve: bool = True) -> None:
    """Refuse `target` (found at key `path`) unless it is allowed; see ALLOWED_TARGETS and
    `user_allowed_targets`."""
    own = user_allowed_targets()
    allowed = ALLOWED_TARGETS + own + (HYDRA_NODE_TARGETS if path.split(".", 1)[0] == "hydra" else ())
    refusal = f"refusing _target_={target} at {path}"
    rule = (
        f"only {', '.join(ALLOWED_TARGETS[:-1])}{''.join(f', {prefix}' for prefix in own)} and Hydra plugin targets are "
        f"instantiated (your own module's: {USER_TARGETS_VARIABLE}=<module>. in the command's environment, docs/layout.md)"
    )
    if not isinstance(target, str) or not target.startswith(allowed):
        raise UserError(f"{refusal}: {rule}")
    if any(not part or part.startswith("__") for part in target.split(".")):  # __globals__, __builtins__, ...
        raise UserError(f"{refusal}: dunder attributes and empty names are not allowed; {rule}")
    # `rlhf.command.subprocess.run` starts with an allowed prefix but is subprocess.run: look at
    # what the name resolves to (importing an allowed module is safe; it is imported to run anyway).
    origin = _runtime_origin(target) if resolve else None
    if origin is not None and not any(origin == prefix[:-1] or origin.startswith(prefix) for prefix in allowed):
        raise UserError(f"{refusal}: it resolves to an object of {origin}; {rule}")


@functools.cache
def shipped_targets() -> frozenset:
    """The `_target_` values of the project's own config files: known good, never imported to check."""
    files = [*(PROJECT_ROOT / "conf").rglob("*.yaml"), *(PROJECT_ROOT / "sweeps").rglob("*.yaml")]
    return frozenset(t for path in files for t in re.findall(r"_target_:\s*([\w.]+)", path.read_text(encoding="utf-8")))


def _targets(node, path: str):
    """(key path, value) of every `_target_` key under a plain container."""
    if isinstance(node, dict):
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            yield from [(sub, value)] if key == "_target_" else _targets(value, sub)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _targets(value, f"{path}[{index}]")


def _runtime_origin(target: str) -> str | None:
    """The module of the object `target` names; None if it cannot be imported (nor instantiated)."""
    obj = imported(target)
    if obj is None or isinstance(obj, types.ModuleType):
        return None if obj is None else obj.__name__
    return getattr(obj, "__module__", None) or getattr(type(obj), "__module__", None) or "<unknown>"


def imported(target):
    """What `instantiate` would call, imported the way Hydra imports it; None if it cannot be."""
    try:
        return get_object(target) if isinstance(target, str) else None
    except Exception:
        return None
