"""Check a composed config before anything loads; each refusal is one line naming key, value and
what is allowed: 1. the `_target_` allowlist (rlhf/targets.py; rlhf.compose checks the command
line's config with it before Hydra runs); 2. values in range, importing neither torch nor trl; 3. unknown keys: a
settings node (one with `_target_`) takes the constructor arguments of its target, bound to its
signature (importing it), and a key added with `+` elsewhere is refused with the nearest one
(Hydra refuses every other unknown key); 4. incompatible choices and the runs a stage starts from."""

from __future__ import annotations

import difflib
import functools
import inspect
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf.errors import UserError, collecting, first_line, raise_problems
from rlhf.extras import VLLM, check_installed, install_command, installed
from rlhf.model_sources import check_hub
from rlhf.models import check_model_directory
from rlhf.ppo.settings import PPO_RULES, check_ppo_batch
from rlhf.registry import STAGES, runs_steps  # the registry only: no stage module is imported
from rlhf.runs import RUN_INPUTS, check_input_runs, finished_run
from rlhf.settings import DATASET_RULES, DPO_RULES, EVAL_RULES, PEFT_RULES, STAGE_RULES, is_int, is_number
from rlhf.targets import check_targets, imported

INSTANTIATE_KEYS = {"_target_", "_args_", "_partial_", "_convert_", "_recursive_"}
TRAINING_ARGUMENTS = "transformers.TrainingArguments"  # what hardware.training_args feeds


def validate(cfg, overrides=None) -> None:
    """Raise UserError (UserErrors: one line per mistake) for what is wrong with the command;
    `overrides` default to those in cfg.hydra, if any. In layers, each reporting every mistake of
    its own: what must hold before anything is imported or built (its first problem), then the
    values' ranges (no import: a wrong value answers at once), then the keys (binding them to
    their settings classes imports those), then the combinations of settings."""
    if overrides is None:
        overrides = OmegaConf.select(cfg, "hydra.overrides.task", default=None) or []
    check_before_launch(cfg)
    for layer in ((check_vllm, check_values), (functools.partial(check_keys, overrides=overrides),), (check_combinations,)):
        problems = []
        for check in layer:
            with collecting(problems):
                check(cfg)
        raise_problems(problems)


def check_before_launch(cfg) -> None:
    """What train.py checks on the composed command line before Hydra starts a run (and every
    run again): none of it imports anything heavy or needs a run directory."""
    check_required(cfg)  # a `???` left unset would surface as a traceback wherever it is read first
    check_local_model(cfg)
    check_targets(cfg)  # nothing below imports or builds anything a config names
    check_installed(cfg)  # a choice whose optional package is not installed (a launcher, before Hydra builds it)


def check_required(cfg) -> None:
    """Every key a config file marks `???` (required, no default: `model=custom`'s name_or_path) is set."""

    def unset_keys(node, prefix):
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            if isinstance(value, (dict, list)):
                yield from unset_keys(value, f"{prefix}{key}.")
            elif value == "???":
                yield f"{prefix}{key}"

    raw = OmegaConf.to_container(cfg, resolve=False)  # unresolved: Hydra's own `${hydra:...}` need not resolve here
    unset = sorted(unset_keys({key: value for key, value in raw.items() if key != "hydra"}, ""))
    if OmegaConf.select(cfg, "model.init_from"):  # a run to start from names the base model itself
        unset = [key for key in unset if key != "model.name_or_path"]
    if unset:
        raise UserError(f"{unset[0]} is required and has no value: add {unset[0]}=... to the command line")


def check_local_model(cfg) -> None:
    """A local `model.name_or_path` holds a transformers model, said before any library loads it."""
    name = OmegaConf.select(cfg, "model.name_or_path")
    if name and not OmegaConf.select(cfg, "model.init_from") and Path(str(name)).expanduser().is_dir():
        check_model_directory(Path(str(name)).expanduser(), str(name))


def check_vllm(cfg) -> None:
    """`use_vllm=true` reaches TRL only where vLLM can run: a CUDA GPU and the vllm package."""
    stage = cfg.get("stage")
    if not OmegaConf.select(cfg, f"{stage}.use_vllm", default=False):
        return
    import torch  # ~2 s, against TRL's ~10

    missing = [
        need
        for need, present in (
            ("a CUDA GPU", torch.cuda.is_available()),
            (f"the vllm package ({install_command(VLLM.name)})", installed(VLLM)),
        )
        if not present
    ]
    if missing:
        raise UserError(f"{stage}.use_vllm=true needs {' and '.join(missing)}; set {stage}.use_vllm=false to sample with transformers")


# ---- 2. values ---------------------------------------------------------------------------
# Each node's rules live with its settings (rlhf/settings.py, rlhf/ppo/settings.py); a stage's own rules add to STAGE_RULES.
NODE_RULES = {"dpo": DPO_RULES, "ppo": PPO_RULES, "eval": EVAL_RULES, "peft": PEFT_RULES, "dataset": DATASET_RULES}
CROSS_FIELD_CHECKS = {"ppo": check_ppo_batch}  # rules between a node's keys, run once each key is in range


def check_values(cfg) -> None:
    """Numbers in range: `dpo.beta=-1: must be > 0`; every one out of range is reported."""
    problems = []
    for name in STAGES:
        if not runs_steps(name) and isinstance(cfg.get(name), DictConfig):
            _check_rules(cfg, name, {**STAGE_RULES, **NODE_RULES.get(name, {})}, problems)
    if isinstance(OmegaConf.select(cfg, "hardware.training_args"), DictConfig):
        _check_rules(cfg, "hardware.training_args", STAGE_RULES, problems)
    for name in ("peft", "dataset"):
        if isinstance(cfg.get(name), DictConfig):
            _check_rules(cfg, name, NODE_RULES[name], problems)
    for name, check in CROSS_FIELD_CHECKS.items():
        if not problems and isinstance(cfg.get(name), DictConfig):  # they read values already in range
            check(cfg[name])
    raise_problems(problems)


def _check_rules(cfg, path: str, rules: dict, problems: list) -> None:
    """Each key of the node at `path` that `rules` names against its rule; the mistakes join `problems`."""
    node = OmegaConf.select(cfg, path)
    for key, rule in rules.items():
        if key in node:
            with collecting(problems):
                _check_rule(node, f"{path}.{key}", key, rule)


def _check_rule(node, where: str, key: str, rule) -> None:
    try:
        value = node[key]
    except Exception as err:
        raise UserError(f"{where}: cannot resolve its value ({first_line(err)})") from None
    if value is None and rule.none_ok:
        return
    if not (is_int(value) if rule.integer else is_number(value)):
        kind = "an integer" if rule.integer else "a number"
        raise UserError(f"{where}={value}: must be {kind} {rule.allowed.removeprefix('an integer ')}".rstrip())
    if not rule.test(value):
        raise UserError(f"{where}={value}: must be {rule.allowed}")


# ---- 3. unknown keys: binding to signatures -----------------------------------------------
def check_keys(cfg, overrides) -> None:
    """A settings node's keys must be constructor arguments of its target (`hardware.training_args`
    those of the stage's settings class); a key added with `+` to any other node is unknown."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    stage_node = raw.get(raw.get("stage")) if isinstance(raw.get("stage"), str) else None
    stage_target = stage_node.get("_target_") if isinstance(stage_node, dict) else None
    problems = []
    for path, node in _settings_nodes(raw, ""):
        target = _training_arguments(stage_target) if path == "hardware.training_args" else node["_target_"]
        fields = init_keys(target)
        for key, value in node.items():
            if fields is not None and key not in fields and key not in INSTANTIATE_KEYS:
                problems.append(f"{path}.{key}={_show(value)}: unknown key, not a field of {target}{did_you_mean(path, key, fields)}")
    for line in overrides:
        key = line.lstrip("+").split("=", 1)[0]
        if not line.startswith("+") or "/" in key or "@" in key or key.split(".")[0] == "hydra":
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and leaf in node and "_target_" not in node and parent != "hardware.training_args":
            others = set(node) - {leaf} - INSTANTIATE_KEYS
            problems.append(f"{key}={_show(node[leaf])}: unknown key{did_you_mean(parent, leaf, others)}")
    raise_problems(problems)


def did_you_mean(parent: str, key: str, names, tail: list = ()) -> str:
    """'; did you mean <parent>.<the name nearest to key>[.<tail>]?', or nothing when none is near."""
    nearest = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
    return f"; did you mean {parent + '.' if parent else ''}{'.'.join([nearest[0], *tail])}?" if nearest else ""


def _training_arguments(stage_target) -> str:
    """hardware.training_args is merged under a Trainer stage's settings; PPO and eval read it as such."""
    stage_class, base = imported(stage_target), imported(TRAINING_ARGUMENTS)
    return stage_target if isinstance(stage_class, type) and issubclass(stage_class, base) else TRAINING_ARGUMENTS


def _settings_nodes(node: dict, path: str):
    """(path, node) of every node with a plain `_target_` (nested ones too), and hardware.training_args."""
    for key, child in node.items():
        where = f"{path}.{key}" if path else str(key)
        if not isinstance(child, dict) or where == "hydra":
            continue
        target = child.get("_target_")
        if (isinstance(target, str) and "${" not in target) or where == "hardware.training_args":
            yield where, child
        yield from _settings_nodes(child, where)


def _show(value) -> str:
    return "{...}" if isinstance(value, dict) else "[...]" if isinstance(value, list) else "null" if value is None else str(value)


# ---- 4. combinations, and the runs a stage starts from (rlhf.runs) -------------------------
def check_combinations(cfg) -> None:
    quantization, stage = cfg.get("quantization"), cfg.get("stage")
    if quantization is not None and cfg.get("peft") is None:
        bits = "4bit" if quantization.get("load_in_4bit") else "8bit" if quantization.get("load_in_8bit") else "<on>"
        fix = "use peft=lora (or quantization=none to train every weight)"
        raise UserError(f"quantization={bits} with peft=none: quantized weights cannot be trained directly; {fix}")
    if runs_steps(stage):  # each step is validated when it runs, with its own overrides
        return
    check_full_finetune_dtype(cfg)
    check_reference_bias(cfg)
    if isinstance(cfg.get("model"), DictConfig):
        check_hub(cfg.model.get("hub"))
        check_tuning(cfg)
    check_input_runs(cfg)


def check_gpu_present(cfg) -> None:
    """A preset that trains on a GPU (hardware.training_args.use_cpu=false) on a machine without
    one: one line, instead of the error transformers raises while building the stage's settings.
    Checked when a run starts, not in `validate`: a GPU config is valid on any machine."""
    if OmegaConf.select(cfg, "hardware.training_args.use_cpu", default=True) is not False:
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            "hardware.training_args.use_cpu=false: this preset trains on a CUDA GPU and none is visible; "
            "use hardware=cpu (or hardware.training_args.use_cpu=true to run the preset's precision on the CPU)"
        )


def check_full_finetune_dtype(cfg) -> None:
    """A run that trains every weight keeps them in float32 (`rlhf.weights_dtype`, which the GPU
    presets use): in bfloat16 or float16 most of AdamW's small updates round away. DeepSpeed's
    optimizer keeps float32 master weights of its own, so its 16-bit weights are allowed."""
    stage, dtype = cfg.get("stage"), str(OmegaConf.select(cfg, "hardware.dtype", default="float32"))
    trains = stage in STAGES and STAGES[stage].makes is not None
    if not trains or cfg.get("peft") is not None or dtype not in ("bfloat16", "float16"):
        return
    if OmegaConf.select(cfg, "hardware.training_args.deepspeed", default=None):
        return
    raise UserError(
        f"hardware.dtype={dtype} with peft=none: every weight would train in {dtype}, where AdamW's small updates round away; "
        "train whole models in float32 weights (hardware.dtype=float32, with hardware.training_args.bf16=true for bfloat16 compute)"
    )


def check_reference_bias(cfg) -> None:
    """Under LoRA the reference of DPO, PPO and the online stages' KL term is the policy with its
    adapter disabled; biases that peft trains in place stay on when it is, so the reference would
    no longer be the starting policy. Refused rather than kept as a second frozen copy."""
    stage, peft = cfg.get("stage"), cfg.get("peft")
    properties = STAGES.get(stage)
    if properties is None or not properties.reference or not isinstance(peft, DictConfig) or peft.get("bias", "none") == "none":
        return
    if properties.strength_zero_drops_reference and OmegaConf.select(cfg, f"{stage}.{properties.strength}") == 0:  # no KL term
        return
    raise UserError(
        f"peft.bias={peft.bias} with stage={stage}: the reference is the policy with its LoRA adapter disabled, and biases "
        "trained in place stay on then, so it would not be the starting policy; use peft.bias=none (or peft=none: a frozen copy)"
    )


def check_tuning(cfg) -> None:
    """A conf/tuning/ file brings one model's stage values (the tiny model's: learning rates up to 10x
    a real model's) and names that model in `tuned_for`: refused for any other model, named
    directly or reached through model.init_from."""
    suited = cfg.get("tuned_for")
    if suited is None:
        return
    model = cfg.model
    while model.get("init_from"):  # the model a run trains is the root of its lineage
        model = finished_run(model.init_from, "model.init_from", stages=RUN_INPUTS["model.init_from"][1]).model
    if model.name_or_path != suited:
        raise UserError(
            f"model.name_or_path={model.name_or_path}: the stage defaults in use are tuned for {suited} "
            f"(conf/tuning/, tuned_for={suited}); choose that model's own config (conf/model/) "
            f"or model=custom model.name_or_path={model.name_or_path}"
        )


@functools.cache
def init_keys(target: str) -> frozenset | None:
    """The keyword arguments `hydra.utils.instantiate` may pass to `target`: the parameters of a
    class's __init__ (a dataclass's fields) or of a function. None when anything goes (**kwargs)
    or it cannot be imported."""
    try:
        params = inspect.signature(imported(target)).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
