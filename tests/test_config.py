"""Config composition: every combination of group options composes, every leaf settings
object builds, and bad choices fail with the valid options listed. No training here."""

import itertools

import pytest
from conftest import CONF, compose_config
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

GROUPS = ("model", "dataset", "stage", "peft", "quantization", "hardware", "logger")


def options(group: str) -> list:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group} has no options"


def combinations():
    """Every combination of the groups that interact (stage, peft, quantization, logger);
    models, datasets and hardware presets are crossed with every stage, and hardware with
    quantization (the compute dtype comes from the hardware preset). Hundreds of
    compositions, not thousands."""
    crossed = ("stage", "peft", "quantization", "logger")
    for combo in itertools.product(*(options(group) for group in crossed)):
        yield dict(zip(crossed, combo))
    for first, second in (("stage", "model"), ("stage", "dataset"), ("stage", "hardware"), ("quantization", "hardware")):
        for a, b in itertools.product(options(first), options(second)):
            yield {first: a, second: b}


@pytest.mark.slow
def test_every_combination_composes():
    combos = list(combinations())
    assert len(combos) >= 100
    for combo in combos:
        overrides = [f"{group}={choice}" for group, choice in combo.items()]
        cfg = compose_config(*overrides)
        assert cfg.stage == combo.get("stage", "sft")
        assert cfg.get(cfg.stage) is not None, overrides  # the stage's own hyperparameter block
        job = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
        OmegaConf.to_container(job, resolve=True)  # every interpolation of the job config resolves


def test_stage_picks_a_fitting_default_dataset():
    assert compose_config().dataset.format == "belle"
    assert compose_config("stage=dpo").dataset.format == "preference"
    assert compose_config("stage=dpo", "dataset=builtin_sft").dataset.format == "belle"  # the user's choice wins


TRL_STAGES = ("sft", "rm", "dpo")  # stages whose settings object is a TRL config (transformers.TrainingArguments)


def test_own_stage_settings_build():
    from rlhf.ppo.trainer import PPOConfig

    settings = instantiate(compose_config("stage=ppo", "ppo.kl_coef=0.05").ppo)
    assert isinstance(settings, PPOConfig) and settings.kl_coef == 0.05


@pytest.mark.parametrize("stage", TRL_STAGES)
@pytest.mark.parametrize("hardware", options("hardware"))
def test_trl_settings_build_for_every_stage_and_hardware(stage, hardware, tmp_path):
    from rlhf.lifecycle import training_args

    cfg = compose_config(f"stage={stage}", f"hardware={hardware}")
    if cfg.hardware.training_args.bf16 and not pytest.importorskip("torch").cuda.is_available():
        pytest.skip("TrainingArguments refuses bf16 on a machine without a GPU")
    args = training_args(cfg, cfg[stage], tmp_path, has_eval=True)
    assert type(args).__name__ == cfg[stage]._target_.rsplit(".", 1)[1]
    assert isinstance(args, __import__("transformers").TrainingArguments)
    assert args.learning_rate == cfg[stage].learning_rate
    assert args.seed == cfg.seed
    assert args.output_dir == str(tmp_path / "checkpoints")


def test_peft_and_quantization_objects_build():
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    lora = instantiate(compose_config("peft=lora", "peft.r=8", "peft.alpha=4").peft)
    assert isinstance(lora, LoraConfig) and lora.r == 8 and lora.lora_alpha == 4
    assert compose_config("peft=none").peft is None
    four = instantiate(compose_config("quantization=4bit").quantization)
    assert isinstance(four, BitsAndBytesConfig) and four.load_in_4bit and four.bnb_4bit_quant_type == "nf4"
    assert compose_config("quantization=none").quantization is None


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as err:
        compose_config("stage=ppo_typo")
    assert "dpo" in str(err.value) and "sft" in str(err.value)


def test_unknown_stage_name_in_a_saved_config_lists_the_valid_ones():
    from rlhf.errors import UserError
    from rlhf.stages import get_stage

    with pytest.raises(UserError, match="valid stages: chain, dpo, eval, grpo, ppo, rloo, rm, sft"):
        get_stage("ppo_typo")


def test_sweep_files_compose():
    grid = compose_config("sweeps=dpo_beta_rank")
    assert grid.stage == "dpo"
    assert grid.hydra.mode.name == "MULTIRUN"
    assert set(grid.hydra.sweeper.params) == {"dpo.beta", "peft.r"}
    try:
        optuna = compose_config("sweeps=dpo_optuna")
    except ConfigCompositionException:
        pytest.skip("hydra-optuna-sweeper is not installed")
    assert optuna.objective == "eval_win_rate"
    assert "OptunaSweeper" in optuna.hydra.sweeper._target_


def test_every_yaml_key_has_a_comment():
    """The contract: every key and list item says what it does (a line that only opens a
    block, such as `hydra:`, is documented by its children)."""
    for path in [*CONF.rglob("*.yaml"), *(CONF.parent / "sweeps").glob("*.yaml")]:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped.endswith(":"):
                continue
            assert "#" in stripped, f"{path.relative_to(CONF.parent)}:{number} has no comment: {stripped}"


REAL_MODELS = [name for name in options("model") if name not in ("tiny", "custom")]


@pytest.mark.parametrize("model", REAL_MODELS)
def test_real_models_get_real_model_hyperparameters(model):
    """The stage files hold real-model values (the reference workflow's); model=tiny's fast
    ones (conf/tuning/tiny_*.yaml) never reach a real model."""
    limits = {"sft": 2e-4, "rm": 1e-4, "dpo": 5e-5, "ppo": 5e-5}  # the tiny values are 10x these
    for stage, limit in limits.items():
        cfg = compose_config(f"model={model}", f"stage={stage}")
        settings = cfg[stage]
        assert 0 < settings.learning_rate <= limit, (model, stage, settings.learning_rate)
        assert cfg.tuned_for is None
        if stage == "ppo":
            assert (settings.kl_coef, settings.adaptive_kl, settings.target, settings.horizon) == (0.1, True, 6.0, 64)
            assert (settings.batch_size, settings.mini_batch_size, settings.ppo_epochs) == (8, 1, 4)
        else:
            assert settings.per_device_train_batch_size * settings.gradient_accumulation_steps == 8
            assert settings.num_train_epochs == 1
        if stage == "dpo":
            assert settings.beta == 0.1


def test_tiny_model_keeps_its_fast_values_and_overrides_still_win():
    expected = {"sft": 2e-3, "rm": 1e-3, "dpo": 5e-4, "ppo": 5e-4}
    for stage, learning_rate in expected.items():
        cfg = compose_config(f"stage={stage}")
        assert cfg[stage].learning_rate == learning_rate and cfg.tuned_for == "builtin:tiny"
    assert compose_config("stage=dpo", "dpo.learning_rate=1e-6").dpo.learning_rate == 1e-6
    assert compose_config("stage=eval").eval.max_new_tokens == 32
    assert compose_config("stage=eval", "model=smollm2-135m").eval.max_new_tokens == 128


def test_qwen3_dpo_follows_its_reference_workflow():
    dpo = compose_config("model=qwen3-0.6b", "stage=dpo").dpo
    assert (dpo.learning_rate, dpo.max_length) == (5e-6, 512)


@pytest.mark.parametrize("stage", ["ppo", "eval", "grpo", "rloo", "dpo", "sft", "rm"])
def test_the_settings_dataclasses_default_to_what_stage_runs(stage):
    """One source of defaults: every key the project's own settings classes declare holds, as its
    dataclass default, the value `stage=<stage>` composes on a real model - so code (and a test)
    building `PPOConfig()` gets what the command line runs. Library fields (trl's, transformers')
    keep the library's defaults, which the YAML overrides on purpose."""
    import dataclasses

    from hydra.utils import get_class
    from omegaconf import OmegaConf

    cfg = compose_config(f"stage={stage}", "model=smollm2-135m")
    node = OmegaConf.to_container(cfg[stage], resolve=True)
    settings_class = get_class(node.pop("_target_"))
    own = {}
    for klass in reversed(settings_class.__mro__):  # the project's classes in the MRO: their fields, the most derived last
        if klass.__module__.startswith("rlhf.") and dataclasses.is_dataclass(klass):
            own.update({f.name: f for f in dataclasses.fields(klass) if f.name in vars(klass).get("__annotations__", {})})
    assert own or not settings_class.__module__.startswith("rlhf."), stage
    differ = []
    for name, declared in own.items():
        default = declared.default_factory() if declared.default_factory is not dataclasses.MISSING else declared.default
        if name not in node:  # only top_p: the sampling API's (rlhf.sample), no stage setting - they sample the whole softmax
            assert name == "top_p" and default == 1.0, f"{settings_class.__name__}.{name} is not in the {stage} YAML"
        elif node[name] != default:
            differ.append(f"{settings_class.__name__}.{name}: dataclass {default!r}, YAML {node[name]!r}")
    assert not differ, differ
