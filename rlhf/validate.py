"""Check a composed job config before any model or dataset loads.

`validate(cfg)` raises `UserError` with one line naming the key, the value and what is allowed:

- `_target_` allowlist: every `_target_` must start with rlhf., trl., peft., transformers.,
  torch.optim. or hydra_plugins., and must not reach a module outside them
  (`rlhf.run.subprocess.run` is refused too). A shared `.hydra/config.yaml` re-run with
  `--config-path` is checked before anything in it is instantiated.
- unknown keys: a settings node (one with `_target_`) takes the constructor arguments of its
  target (the dataclass fields of trl.DPOConfig, rlhf.trainers.KLDPOConfig, PPOConfig, ...);
  `hardware.training_args` takes transformers.TrainingArguments fields; the other nodes take
  the keys their config-group files define. The nearest valid key is suggested.
- values out of range (`dpo.beta=-1: must be > 0`), incompatible choices (quantization with
  peft=none), and runs a stage starts from that do not exist or did not finish.

`check_overrides(argv)` is the command-line half: Hydra itself refuses to override a key the
config lacks, with a message of its own; called by train.py before Hydra, it names the nearest
valid key instead (`dpo.betta=0.1: unknown key; did you mean dpo.beta?`).

Speed: nothing is imported for what the project's config files define themselves, so
`dpo.beta=-1` fails in well under a second. A `_target_` the config files do not use is
imported to see what it resolves to, and a settings class is imported to ask about a key no
config file defines (`+dpo.betta=1`): seconds for trl, which the run would import anyway.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from rlhf import PROJECT_ROOT
from rlhf.errors import UserError, first_line
from rlhf.model_sources import check_hub
from rlhf.runs import finished_run

CONF_DIR = PROJECT_ROOT / "conf"
EXTRA_GROUP_DIRS = {"sweeps": PROJECT_ROOT / "sweeps"}  # on Hydra's search path (conf/config.yaml)

ALLOWED_TARGETS = ("rlhf.", "trl.", "peft.", "transformers.", "torch.optim.", "hydra_plugins.")
# Hydra's own settings (the `hydra` node) also name Hydra's core plugins and the Optuna sampler.
HYDRA_NODE_TARGETS = ("hydra._internal.core_plugins.", "optuna.samplers.")
INSTANTIATE_KEYS = {"_target_", "_args_", "_partial_", "_convert_", "_recursive_"}
FREE_FORM = ("hydra", "chain.steps")  # Hydra's settings; a chain's step names are the user's own
TRAINING_ARGUMENTS = "transformers.TrainingArguments"  # what hardware.training_args feeds


# ---- the entry points -------------------------------------------------------------------


def validate(cfg) -> None:
    """Raise UserError, naming key, value and what is allowed, at the first problem in `cfg`."""
    check_targets(cfg)  # first: nothing below imports or builds anything a config names
    check_keys(cfg)  # imports a settings class only for a key no config file defines
    check_values(cfg)
    check_combinations(cfg)


def check_overrides(argv) -> None:
    """Raise UserError for a command-line override of a key that no config file defines, with
    the nearest valid key. Call it with `sys.argv[1:]` before Hydra composes the config.

    Reads the YAML files only (no composition, a few ms). It refuses only keys that no config
    file under conf/ or sweeps/ (nor the --config-path/--config-name file) defines; every other
    key is left to Hydra, which still refuses what this check lets through (`dpo.beta=0.3`
    without stage=dpo). Skipped with --config-dir, --help, --info and --experimental-rerun."""
    overrides, primary, skip = _split_command_line(list(argv))
    if primary is not None and not skip:
        check_primary_targets(primary)
    if skip or not overrides:
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # a syntax error: Hydra reports it
        return
    schema = _schema(str(CONF_DIR), primary)
    added = {o.key_or_group for o in parsed if o.type in (OverrideType.ADD, OverrideType.FORCE_ADD)}
    for arg, override in zip(overrides, parsed):
        key = override.key_or_group
        if key.endswith("_target_") and override.type != OverrideType.DEL:  # hydra.callbacks are built before any run-time check
            check_target(override.value(), key)
        if override.type not in (OverrideType.CHANGE, OverrideType.DEL) or override.package is not None:
            continue
        if key.split(".", 1)[0] == "hydra" or "/" in key or key in added or schema.knows(key):
            continue
        if override.type == OverrideType.DEL:
            raise UserError(f"{arg}: {key} is not in this config; nothing to delete")
        parent = key.rpartition(".")[0]
        candidates = schema.children(parent) if parent in schema.nodes else set()
        hint = _suggestion(key, candidates, schema)
        owner = _settings_class(parent, schema)
        if owner and not hint.startswith("; did"):  # maybe a field the YAML does not list
            hint += f" (to set a field of {owner} that the config does not list, use +{key}=...)"
        raise UserError(f"{arg}: unknown key{hint}")


def _settings_class(node: str, schema) -> str | None:
    """The class whose constructor a node's keys feed, when the config files agree on one."""
    if node == "hardware.training_args":
        return TRAINING_ARGUMENTS
    targets = schema.targets.get(node, set())
    return next(iter(targets)) if len(targets) == 1 else None


# ---- 1. the _target_ allowlist ----------------------------------------------------------


def check_targets(cfg) -> None:
    """Every `_target_` anywhere in the config (lists included) must name something under an
    allowed prefix, and - unless the project's own config files use that very target - must
    resolve to an object of an allowed module (which imports it)."""
    shipped = set().union(*_schema(str(CONF_DIR), None).targets.values())
    for path, target in _resolved_targets(cfg):
        check_target(target, path, resolve=target not in shipped)


def _resolved_targets(cfg):
    raw = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    for path, target in _targets(raw, ""):
        if isinstance(target, str) and "${" in target:  # an interpolation: check what it becomes
            try:
                target = OmegaConf.select(cfg, path, throw_on_resolution_failure=True)
            except Exception as err:
                raise UserError(f"{path}={raw_value(raw, path)}: cannot resolve it ({first_line(err)})") from None
        yield path, target


def check_target(target, path: str, resolve: bool = True) -> None:
    """Refuse `target` (found at key `path`) unless it is allowed; see ALLOWED_TARGETS."""
    allowed = ALLOWED_TARGETS + (HYDRA_NODE_TARGETS if path.split(".", 1)[0] == "hydra" else ())
    refusal = f"refusing _target_={target} at {path}"
    rule = f"only {', '.join(ALLOWED_TARGETS[:-1])} and Hydra plugin targets are instantiated"
    if not isinstance(target, str) or not target.startswith(allowed):
        raise UserError(f"{refusal}: {rule}")
    parts = target.split(".")
    if any(not part or part.startswith("__") for part in parts):  # __globals__, __builtins__, ...
        raise UserError(f"{refusal}: dunder attributes and empty names are not allowed; {rule}")
    if not resolve:
        return
    # `rlhf.run.subprocess.run` starts with an allowed prefix but is subprocess.run: look at
    # what the name resolves to (importing an allowed module is safe; it is imported to run anyway).
    origin = _runtime_origin(target)
    if origin is not None and not _allowed_module(origin, allowed):
        raise UserError(f"{refusal}: it resolves to an object of {origin}; {rule}")


def check_primary_targets(primary: str) -> None:
    """The `_target_`s of a config named with --config-path/--config-name (a shared run's saved
    config, say), checked before Hydra reads it: Hydra instantiates `hydra.callbacks` before the
    run - and validate() - starts. An interpolated target there cannot be judged unresolved."""
    try:
        raw = yaml.safe_load(Path(primary).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return  # Hydra reports what is wrong with the file
    shipped = set().union(*_schema(str(CONF_DIR), None).targets.values())
    for path, target in _targets(raw, ""):
        if isinstance(target, str) and "${" in target:
            raise UserError(
                f"refusing _target_={target} at {path} in {primary}: an interpolated target is not instantiated "
                "from a config named on the command line"
            )
        check_target(target, path, resolve=target not in shipped)


def _targets(node, path: str):
    """(key path, value) of every `_target_` key under a plain container."""
    if isinstance(node, dict):
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield sub, value
            else:
                yield from _targets(value, sub)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _targets(value, f"{path}[{index}]")


def _allowed_module(module: str, allowed: tuple) -> bool:
    return any(module == prefix[:-1] or module.startswith(prefix) for prefix in allowed)


def raw_value(raw, path: str):
    node = raw
    for part in re.split(r"\.|\[(\d+)\]", path):
        if part:
            node = node[int(part)] if isinstance(node, list) else node.get(part)
    return node


# ---- 2. unknown keys --------------------------------------------------------------------


def check_keys(cfg) -> None:
    """Every key must be read by something: a settings node's keys are its target's
    constructor arguments, other nodes' keys those their config-group files define."""
    schema = _schema(str(CONF_DIR), None)
    raw = OmegaConf.to_container(cfg, resolve=False)
    stage_target = None
    stage = raw.get("stage")
    if isinstance(stage, str) and isinstance(raw.get(stage), dict):
        stage_target = raw[stage].get("_target_")
    _check_node_keys(raw, "", schema, stage_target)


def _check_node_keys(node: dict, path: str, schema, stage_target) -> None:
    if path in FREE_FORM:
        return
    target = node.get("_target_")
    if path == "hardware.training_args":  # merged under the stage's settings object
        target = stage_target or TRAINING_ARGUMENTS
    if isinstance(target, str) and "${" not in target:
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key in INSTANTIATE_KEYS or schema.knows(where):
                continue
            fields = init_keys(target)  # a key no config file defines: ask the class itself
            if fields is not None and key not in fields:
                raise UserError(
                    f"{where}={_show(value)}: unknown key, not a field of {target}"
                    f"{_suggestion(where, set(fields) | schema.children(path), schema, relative=True)}"
                )
        return  # nested values of a settings node are its arguments, not config keys
    for key, value in node.items():
        where = f"{path}.{key}" if path else str(key)
        if where in FREE_FORM:
            continue
        if not schema.knows(where):
            candidates = schema.children(path)
            raise UserError(f"{where}={_show(value)}: unknown key{_suggestion(where, candidates, schema, relative=True)}")
        if isinstance(value, dict):
            _check_node_keys(value, where, schema, stage_target)


def _suggestion(key: str, candidates, schema, relative: bool = False) -> str:
    """'; did you mean X?' with the nearest valid key, or the valid keys when few."""
    parent, _, leaf = key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    names = sorted({c for c in candidates if c not in INSTANTIATE_KEYS})
    close = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    if not relative and parent not in schema.nodes:  # the parent itself is a typo: match whole keys
        whole = difflib.get_close_matches(key, sorted(schema.leaves_at_depth(key.count("."))), n=1, cutoff=0.6)
        if whole:
            return f"; did you mean {whole[0]}?"
    if names and len(names) <= 20:
        return f"; valid keys{' under ' + parent if parent else ''}: {', '.join(names)}"
    return ""


def _show(value) -> str:
    if isinstance(value, (dict, list)):
        return "{...}" if isinstance(value, dict) else "[...]"
    return "null" if value is None else str(value)


# ---- 3. values --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    test: object  # value -> bool
    allowed: str  # what the message says is allowed
    integer: bool = False  # the value must be a whole number
    none_ok: bool = False  # null means "off" or "the default"


def _between(low, high, low_open=False, high_open=False):
    def test(value):
        return (value > low if low_open else value >= low) and (value < high if high_open else value <= high)

    return test


POSITIVE = Rule(lambda v: v > 0, "> 0")
NON_NEGATIVE = Rule(lambda v: v >= 0, ">= 0")
AT_LEAST_ONE = Rule(lambda v: v >= 1, "an integer >= 1", integer=True)
UNIT = Rule(_between(0, 1), "in [0, 1]")

TOP_P = Rule(_between(0, 1, low_open=True), "in (0, 1]")
OPTIONAL_LENGTH = Rule(lambda v: v >= 1, "an integer >= 1 (or null)", integer=True, none_ok=True)

# Keys every stage node (sft, rm, dpo, ppo, any later one) and hardware.training_args may hold.
STAGE_RULES = {
    "learning_rate": POSITIVE,
    "per_device_train_batch_size": AT_LEAST_ONE,
    "per_device_eval_batch_size": AT_LEAST_ONE,
    "gradient_accumulation_steps": AT_LEAST_ONE,
    "max_length": OPTIONAL_LENGTH,
    "warmup_steps": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,
}
# Keys of particular nodes (a stage's own rules add to STAGE_RULES).
NODE_RULES = {
    "dpo": {
        "beta": POSITIVE,
        "label_smoothing": Rule(_between(0, 0.5, high_open=True), "in [0, 0.5)"),
        "kl_coef": NON_NEGATIVE,
    },
    "ppo": {
        "batch_size": AT_LEAST_ONE,
        "mini_batch_size": AT_LEAST_ONE,
        "ppo_epochs": AT_LEAST_ONE,
        "total_updates": AT_LEAST_ONE,
        "max_prompt_length": AT_LEAST_ONE,  # prompts are cut to it: there is no "no limit"
        "max_new_tokens": AT_LEAST_ONE,
        "kl_coef": NON_NEGATIVE,
        "cliprange": POSITIVE,
        "cliprange_value": POSITIVE,
        "gamma": UNIT,
        "lam": UNIT,
        "temperature": POSITIVE,
        "top_p": TOP_P,
        "horizon": POSITIVE,
        "target": POSITIVE,
        "vf_coef": NON_NEGATIVE,
        "logging_steps": AT_LEAST_ONE,
        "eval_prompts": AT_LEAST_ONE,
        "save_steps": Rule(lambda v: v >= 0, "an integer >= 0 (0 = no checkpoints)", integer=True),
        "save_total_limit": AT_LEAST_ONE,
        "max_grad_norm": POSITIVE,  # PPO clips to it every step: 0 would zero every gradient
    },
    "eval": {
        "num_prompts": AT_LEAST_ONE,
        "batch_size": AT_LEAST_ONE,
        "max_prompt_length": AT_LEAST_ONE,
        "max_new_tokens": AT_LEAST_ONE,
        "temperature": Rule(lambda v: v >= 0, ">= 0 (0 = greedy decoding)"),
        "top_p": TOP_P,
    },
    "peft": {
        "r": AT_LEAST_ONE,
        "alpha": POSITIVE,
        "dropout": Rule(_between(0, 1, high_open=True), "in [0, 1)"),
    },
    "dataset": {
        "test_size": Rule(lambda v: v >= 0 and (v < 1 or float(v).is_integer()), ">= 0: a fraction below 1 or a count of rows"),
        "max_samples": OPTIONAL_LENGTH,
    },
}


def check_values(cfg) -> None:
    """Numbers in range: `dpo.beta=-1: must be > 0`."""
    nodes = [name for name in _stage_names() if isinstance(cfg.get(name), DictConfig)]
    for name in nodes:
        _check_rules(cfg, name, {**STAGE_RULES, **NODE_RULES.get(name, {})})
    if isinstance(cfg.get("hardware"), DictConfig) and isinstance(cfg.hardware.get("training_args"), DictConfig):
        _check_rules(cfg, "hardware.training_args", STAGE_RULES)
    for name in ("peft", "dataset"):
        if isinstance(cfg.get(name), DictConfig):
            _check_rules(cfg, name, NODE_RULES[name])
    ppo = cfg.get("ppo")
    if isinstance(ppo, DictConfig) and _is_int(ppo.get("batch_size")) and _is_int(ppo.get("mini_batch_size")):
        if ppo.batch_size % ppo.mini_batch_size:
            raise UserError(f"ppo.batch_size={ppo.batch_size}: must be a multiple of ppo.mini_batch_size={ppo.mini_batch_size}")


def _check_rules(cfg, path: str, rules: dict) -> None:
    node = OmegaConf.select(cfg, path)
    for key, rule in rules.items():
        if key not in node:
            continue
        try:
            value = node[key]
        except Exception as err:
            raise UserError(f"{path}.{key}: cannot resolve its value ({first_line(err)})") from None
        if value is None and rule.none_ok:
            continue
        kind = "an integer" if rule.integer else "a number"
        if not (_is_int(value) if rule.integer else _is_number(value)):
            raise UserError(f"{path}.{key}={value}: must be {kind} {rule.allowed.removeprefix('an integer ')}".rstrip())
        if not rule.test(value):
            raise UserError(f"{path}.{key}={value}: must be {rule.allowed}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stage_names() -> list:
    from rlhf.stages import available_stages  # pkgutil only: no stage module is imported

    return available_stages()


# ---- 4. combinations and the runs a stage starts from -----------------------------------


def check_combinations(cfg) -> None:
    quantization, stage = cfg.get("quantization"), cfg.get("stage")
    if quantization is not None and cfg.get("peft") is None:
        bits = "4bit" if quantization.get("load_in_4bit") else "8bit" if quantization.get("load_in_8bit") else "<on>"
        raise UserError(
            f"quantization={bits} with peft=none: quantized weights cannot be trained directly; "
            "use peft=lora (or quantization=none to train every weight)"
        )
    if stage == "chain":  # each step is validated when it runs, with its own overrides
        return
    if isinstance(cfg.get("model"), DictConfig):
        check_hub(cfg.model.get("hub"))
        check_tuning(cfg)
    for key, (needed_by, stages) in RUN_INPUTS.items():
        value = OmegaConf.select(cfg, key)
        if needed_by == stage and not value:
            raise UserError(f"{key}={_show(value)}: stage={stage} needs {key}=<directory of a finished stage={'/'.join(stages)} run>")
        if value:
            finished_run(value, key, stages=stages)


def check_tuning(cfg) -> None:
    """model=tiny brings the tiny model's stage values (conf/tuning/tiny_*.yaml: learning rates
    10-100x a real model's). Refuse them for any other model - named directly or reached through
    model.init_from - rather than silently train it with them."""
    if cfg.get("tuned_for") != "tiny":
        return
    model = cfg.model
    while model.get("init_from"):  # the model a run trains is the root of its lineage
        model = finished_run(model.init_from, "model.init_from", stages=RUN_INPUTS["model.init_from"][1]).model
    if model.name_or_path != TINY_MODEL:
        raise UserError(
            f"model.name_or_path={model.name_or_path} with model=tiny: the stage defaults are then the tiny model's "
            "(conf/tuning/tiny_*.yaml, learning rates 10-100x a real model's); choose the model's config "
            f"(model=smollm2-135m | qwen2.5-1.5b-instruct | qwen3-0.6b) or model=custom model.name_or_path={model.name_or_path}"
        )


TINY_MODEL = "builtin:tiny"

# Settings that name an earlier run: key -> (the stage that cannot do without it, or None; the stages that run may be).
RUN_INPUTS = {
    "model.init_from": (None, ("sft", "dpo", "ppo")),
    "ppo.reward_model": ("ppo", ("rm",)),
    "eval.policy": ("eval", ("sft", "dpo", "ppo")),
    "eval.reward_model": ("eval", ("rm",)),
}


# ---- the keys the config files define ---------------------------------------------------


class _Schema:
    """Every key some config file can set: `kinds[dotted key]` is "node", "list" or "leaf";
    `targets[node]` the `_target_` values files give that node; `groups` the group names."""

    def __init__(self):
        self.kinds, self.targets, self.groups = {}, {}, set()

    @property
    def nodes(self):
        return {key for key, kind in self.kinds.items() if kind == "node"} | {""}

    def knows(self, key: str) -> bool:
        if key in self.kinds or key in self.groups:
            return True
        parts = key.split(".")  # an index into a list value: dpo.loss_type.0
        return any(self.kinds.get(".".join(parts[:n])) == "list" for n in range(1, len(parts)))

    def children(self, parent: str) -> set:
        depth = parent.count(".") + 1 if parent else 0
        names = {key.split(".")[depth] for key in self.kinds if (key.startswith(parent + ".") if parent else True)}
        return names | (self.groups if not parent else set())

    def leaves_at_depth(self, depth: int) -> set:
        return {key for key in self.kinds if key.count(".") == depth} | (self.groups if depth == 0 else set())

    def add(self, data, prefix: str) -> None:
        if not isinstance(data, dict):
            return
        parts = prefix.split(".") if prefix else []
        for n in range(1, len(parts) + 1):  # the node a group's file fills, and its parents
            self.kinds[".".join(parts[:n])] = "node"
        for key, value in data.items():
            if not prefix and key in ("defaults", "hydra"):
                continue
            where = f"{prefix}.{key}" if prefix else str(key)
            kind = "node" if isinstance(value, dict) else "list" if isinstance(value, list) else "leaf"
            if self.kinds.get(where) != "node":
                self.kinds[where] = kind
            if key == "_target_" and isinstance(value, str):
                self.targets.setdefault(prefix, set()).add(value)
            if isinstance(value, dict):
                self.add(value, where)


@functools.lru_cache(maxsize=8)
def _schema(conf_dir: str, primary: str | None) -> _Schema:
    schema = _Schema()
    roots = [(Path(conf_dir), "")] + [(path, name) for name, path in EXTRA_GROUP_DIRS.items()]
    for root, group_prefix in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.yaml")):
            rel = path.relative_to(root).parent.as_posix()
            group = "/".join(part for part in (group_prefix, "" if rel == "." else rel) if part)
            if group.split("/", 1)[0] == "hydra":
                continue
            if group:
                schema.groups.add(group.split("/", 1)[0])
            text = path.read_text(encoding="utf-8")
            package = _package(text, group)
            try:
                schema.add(yaml.safe_load(text), package)
            except yaml.YAMLError:
                continue
    if primary:
        try:
            schema.add(yaml.safe_load(Path(primary).read_text(encoding="utf-8")), "")
        except (OSError, yaml.YAMLError):
            pass
    return schema


def _package(text: str, group: str) -> str:
    """The node a config file's keys land in: its `# @package` header, else its group."""
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        match = re.match(r"#\s*@package\s+(\S+)", line)
        if match:
            package = match.group(1).replace("_group_", group.replace("/", "."))
            return "" if package == "_global_" else package.removeprefix("_global_.")
    return group.replace("/", ".")


def _split_command_line(argv: list):
    """(the overrides, the primary config file when --config-path/--config-name name one,
    whether to skip the check) from train.py's arguments, as Hydra's parser reads them."""
    value_flags = {
        "--config-path": "cp",
        "-cp": "cp",
        "--config-name": "cn",
        "-cn": "cn",
        "--config-dir": "cd",
        "-cd": "cd",
        "--cfg": None,
        "-c": None,
        "--package": None,
        "-p": None,
        "--experimental-rerun": "skip",
    }
    skip_flags = {"--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc", "--info", "-i"}
    overrides, named, skip = [], {}, False
    args = iter(argv)
    for arg in args:
        flag, eq, inline = arg.partition("=")
        if arg.startswith("-") and flag in value_flags:
            value = inline if eq else next(args, None)
            if value_flags[flag]:
                named[value_flags[flag]] = value
        elif arg.startswith("-"):
            skip = skip or flag in skip_flags
        else:
            overrides.append(arg)
    if "cd" in named or "skip" in named:
        skip = True  # another search path or a re-run: leave it to Hydra
    primary = None
    if "cp" in named or "cn" in named:
        directory = PROJECT_ROOT / (named.get("cp") or CONF_DIR)  # relative to train.py, like Hydra
        name = named.get("cn") or "config"
        primary = str(directory / (name if name.endswith(".yaml") else name + ".yaml"))
        if not Path(primary).is_file():
            skip = True  # Hydra says the config is missing
    return overrides, primary, skip


# ---- the constructor arguments of a target ----------------------------------------------


@functools.cache
def init_keys(target: str) -> frozenset | None:
    """The keyword arguments `hydra.utils.instantiate` may pass to `target`: the parameters of
    a class's __init__ (a dataclass's fields) or of a function. None when anything goes
    (**kwargs) or it cannot be imported. Imports the target: only asked for keys the config
    files do not define, so a normal run with a typo-free config never pays for it here."""
    import inspect

    obj = _import_object(target)
    if obj is None:
        return None
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _runtime_origin(target: str) -> str | None:
    """The module the object `target` names comes from (importing it); None if it cannot be
    imported, and then `instantiate` cannot call it either."""
    import types

    obj = _import_object(target)
    if obj is None:
        return None
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    return getattr(obj, "__module__", None) or getattr(type(obj), "__module__", None) or "<unknown>"


def _import_object(target: str):
    """What `instantiate` would call, imported the way Hydra imports it; None if it cannot be."""
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception:
        return None
