"""Compose a config as `python train.py <overrides>` does, with Hydra's compose API, and turn
Hydra's composition errors into the project's one-line `error:`.

- `check_command_line(argv)`, called by train.py before Hydra runs: composes the command line's
  config (a sweep's first job) and checks it (`validate.check_before_launch`: required keys, a
  local model directory, every `_target_` - Hydra's own node included, before Hydra instantiates
  `hydra.callbacks`, so a shared config re-run with --config-path gets no chance to run
  `os.system` - and the extras its choices need) before Hydra makes a run directory.
- `compose(overrides)`: the config, or `UserError` naming the override at fault
  (`dpo.betta=0.1: unknown key; did you mean dpo.beta?`, `stage=dpoo: no stage config named
  dpoo; did you mean stage=dpo? ...`). Chain steps compose through it too.

Composing imports no torch: `--cfg job` and a typo answer in well under a second.
"""

import difflib
import os
import re
from pathlib import Path

from omegaconf import OmegaConf

from rlhf import PROJECT_ROOT
from rlhf.compat import hydra_override_error
from rlhf.errors import UserError
from rlhf.extras import plugin_extra
from rlhf.registry import available_stages
from rlhf.targets import check_targets
from rlhf.validate import INSTANTIATE_KEYS, TRAINING_ARGUMENTS, check_before_launch, did_you_mean, init_keys


def check_command_line(argv) -> None:
    """Compose what `python train.py <argv>` runs (a sweep's first job) and check its targets."""
    from rlhf.compat import hydra_arguments

    args = hydra_arguments(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun or args.config_dir:
        return  # no job runs, or another search path: Hydra handles it alone
    config_dir = PROJECT_ROOT / (args.config_path or "conf")  # relative to train.py, like Hydra
    if not (config_dir / f"{args.config_name or 'config'}.yaml").is_file():
        return  # Hydra says what is missing
    cfg = compose(first_job(args.overrides), config_dir=str(config_dir), config_name=args.config_name or "config")
    if args.cfg:  # printed, not run: a config with a `???` or an uninstalled choice is still shown
        check_targets(cfg)
        return
    check_before_launch(cfg)  # before Hydra makes a run directory or instantiates a launcher
    key = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
    check_output_dir(OmegaConf.select(cfg, key), key)


def check_output_dir(path, key: str) -> None:
    """Refuse, in one line, a run directory that cannot be created: Hydra would create it with
    a traceback (a path under a regular file, a read-only mount)."""
    if not path:
        return
    existing = Path(str(path)).expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{key}={path}: the run directory cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key}={path}: the run directory cannot be created: {existing} is not writable")


def first_job(overrides: list) -> list:
    """The overrides of a sweep's first job (`dpo.beta=0.1,0.3` -> `dpo.beta=0.1`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # a syntax error
        raise UserError("; ".join(str(err).splitlines()[:2])) from None
    job = []
    for line, override in zip(overrides, parsed):
        if override.is_sweep_override():
            try:
                line = f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"
            except Exception:  # an interval for a sweeper to sample: no first value
                continue
        job.append(line)
    return job


def compose(overrides: list, config_dir: str | None = None, config_name: str = "config", hydra_node: bool = True):
    """The config Hydra composes for `overrides` (with Hydra's node unless hydra_node=False), or a
    one-line UserError. Inside a running job (a chain step) Hydra is initialised already and its
    search path is used."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def attempt(lines):
        if GlobalHydra.instance().is_initialized() and config_dir is None:
            return hydra_compose(config_name, overrides=lines, return_hydra_config=hydra_node), groups()
        with initialize_config_dir(config_dir=config_dir or str(PROJECT_ROOT / "conf"), version_base="1.3"):
            return hydra_compose(config_name, overrides=lines, return_hydra_config=hydra_node), groups()

    def groups():
        loader = GlobalHydra.instance().config_loader()
        return {name: loader.get_group_options(name) for name in loader.list_groups("") if name != "hydra"}

    try:
        return attempt(overrides)[0]
    except Exception as err:
        if missing := plugin_extra(str(err)):  # a sweeper or launcher whose plugin is not installed
            raise UserError(missing) from None
        error = hydra_override_error(str(err))
        line = failing_override(error, overrides)
        if line is None:
            raise UserError("; ".join(part.strip() for part in str(err).splitlines()[:2] if part.strip()) or type(err).__name__) from None
        try:
            cfg, options = attempt([o for o in overrides if o != line])
        except Exception:
            cfg, options = OmegaConf.create(), {}
        raise UserError(f"{line}: {composition_message(error, cfg, options)}") from None


def failing_override(error: tuple | None, overrides: list) -> str | None:
    """The command-line override that Hydra's composition error (`hydra_override_error`) is about."""
    if error is None:
        return None
    key = error[1]
    return next((line for line in overrides if re.fullmatch(r"[+~]*" + re.escape(key) + r"(@\S+)?(=.*)?", line)), None)


def composition_message(error: tuple, cfg, groups: dict) -> str:
    kind, key, option = error
    if kind == "no_option":  # an option of a config group
        close = difflib.get_close_matches(option, groups.get(key, []), n=1, cutoff=0.6)
        hint = f"did you mean {key}={close[0]}? " if close else ""
        return f"no {key} config named {option}; {hint}options: {', '.join(groups.get(key, []))}"
    if kind == "not_in_config":
        return f"{key} is not in this config; nothing to delete"
    if kind == "already_set":
        return f"{key} is already in the config; set it without the +"
    return f"unknown key{nearest_key(key, cfg, groups)}"


def nearest_key(key: str, cfg, groups: dict) -> str:
    """'; did you mean X?' for a key the config lacks, walking down from its root; else a hint."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    parts, node, found = key.split("."), raw, []
    for index, part in enumerate(parts):
        names = [name for name in node if name not in INSTANTIATE_KEYS] + (list(groups) if not found else [])
        if part not in node or index == len(parts) - 1 or not isinstance(node[part], dict):
            break
        node, found = node[part], [*found, part]
    close = "" if part in names else did_you_mean(".".join(found), part, set(names), tail=parts[len(found) + 1 :])
    if close:
        return close
    if part in groups and part not in node:
        return (
            f"; this config has no {part} node (stage={part} brings it)"
            if part in available_stages()
            else f"; select {part}=<option> first"
        )
    target = TRAINING_ARGUMENTS if ".".join(found) == "hardware.training_args" else node.get("_target_")
    if isinstance(target, str) and part in (init_keys(target) or ()):
        return f" (to set a field of {target} that the config does not list, use +{key}=...)"
    return f"; valid keys under {'.'.join(found)}: {', '.join(sorted(names))}" if found and len(names) <= 20 else ""


def help_text(config_dir: Path = PROJECT_ROOT / "conf") -> str:
    """`python train.py --help`: the groups a user chooses from (those in conf/config.yaml's
    defaults list, the ready sweeps, Hydra's launchers and sweepers) with their options, the
    default starred, and a plugin that is not installed named with its extra."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlhf.extras import PLUGIN_CONFIGS
    from rlhf.registry import STAGES

    defaults = {}
    for entry in OmegaConf.to_container(OmegaConf.load(config_dir / "config.yaml").defaults):
        if isinstance(entry, dict):  # not `_self_`; not `optional tuning` or `override hydra/...`: no group a user picks
            defaults.update({group: option for group, option in entry.items() if " " not in group})
    defaults.update({"hydra/launcher": "basic", "hydra/sweeper": "basic"})
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        options = {group: loader.get_group_options(group) for group in defaults if group != "sweeps"}
    GlobalHydra.instance().clear()
    options["sweeps"] = sorted(path.stem for path in (PROJECT_ROOT / "sweeps").glob("*.yaml"))  # on the search path at run time
    for config, extra in PLUGIN_CONFIGS.items():
        group, name = config.rsplit("/", 1)
        if name not in options[group]:
            options[group].append(f"{name} (needs the [{extra.name}] extra)")
    lines = ["python train.py [group=option ...] [key=value ...] [-m]", "", "Config groups (* marks the default):"]
    for group, names in options.items():
        names = [f"{name}*" if name == defaults[group] else name for name in names if not name.endswith("_schema")]
        lines.append(f"  {group}: {', '.join(names)}")
    settings = ", ".join(f"{stage}.*" for stage in available_stages() if not STAGES[stage].steps)
    return "\n".join(
        [
            *lines,
            "",
            f"Each stage's settings are under its own key ({settings}); LoRA under peft.*, data under dataset.*.",
            "  python train.py stage=dpo --cfg job              # print the composed config: every key and its value",
            "  python train.py stage=dpo dpo.beta=0.1,0.3 -m    # a sweep: one directory under multirun/, a job per value",
            "More: README.md, and docs/configuration.md for every group and key.",
        ]
    )
