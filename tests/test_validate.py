"""Config validation before anything loads (`rlhf.validate`): unknown keys with the nearest
valid one, values out of range, incompatible choices and missing input runs, and the
`_target_` allowlist. Each message is one line naming the key and its value.

The command line is composed by Hydra (`rlhf.compose.check_command_line`, called by train.py
before Hydra runs), which turns composition errors into one line; `rlhf.command.run_stage` calls
`validate(cfg, overrides)`. The tests at the end (`test_cli_*`) run `python train.py`.
"""

import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, cli, compose_config
from omegaconf import OmegaConf, open_dict

from rlhf.compose import check_command_line
from rlhf.errors import UserError
from rlhf.targets import check_target
from rlhf.validate import validate


def refused(cfg) -> str:
    """The one-line message validate raises for `cfg`."""
    with pytest.raises(UserError) as caught:
        validate(cfg)
    message = str(caught.value)
    assert "\n" not in message
    return message


def fake_run(path, stage: str, finished: bool = True, model: str = "builtin:tiny"):
    """A run directory as `rlhf.runs.finished_run` reads it (no weights needed to validate)."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(f"stage: {stage}\nmodel:\n  name_or_path: {model}\n")
    if finished:
        (path / "metrics.json").write_text("{}")
        (path / "final").mkdir()
    return path


# ---- every shipped configuration passes ---------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("stage=dpo",),
        ("stage=rm",),
        ("experiment=rlhf_chain",),
        ("experiment=dpo_chain",),
        ("stage=dpo", "peft=none"),
        ("quantization=4bit",),
        ("quantization=8bit", "hardware=gpu", "logger=wandb"),
        ("sweeps=dpo_beta_rank",),
        ("model=qwen3-0.6b", "dataset=hh_rlhf", "stage=dpo"),
        ("stage=grpo", "+grpo.reward_model=null"),
        ("stage=rloo", "model=smollm2-135m"),
        ("experiment=grpo_chain",),
        ("experiment=grpo_arithmetic",),
    ],
)
def test_shipped_configs_pass(overrides):
    validate(compose_config(*overrides))


def test_bad_values_are_refused_before_any_heavy_import():
    """Range checks come first and need no import: `dpo.beta=-1` answers at once."""
    code = (
        "import sys, time; sys.path[:0] = ['tests']\n"
        "from conftest import compose_config\n"
        "cfg = compose_config('stage=dpo', 'dpo.beta=-1')\n"
        "start = time.perf_counter()\n"
        "from rlhf.validate import validate\n"
        "from rlhf.errors import UserError\n"
        "try:\n"
        "    validate(cfg)\n"
        "except UserError as err:\n"
        "    print(err)\n"
        "print(time.perf_counter() - start)\n"
        "print(sorted({'torch', 'transformers', 'trl', 'peft', 'datasets'} & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    message, seconds, heavy = done.stdout.split("\n")[:3]
    assert message == "dpo.beta=-1: must be > 0"
    assert heavy == "[]"
    assert float(seconds) < 2.0


# ---- 1. unknown keys ------------------------------------------------------------------------


def test_added_key_that_is_no_field_of_the_settings_class_is_refused_with_the_nearest():
    message = refused(compose_config("stage=dpo", "+dpo.betta=1"))
    assert message.startswith("dpo.betta=1: unknown key")
    assert "rlhf.dpo_trainer.KLDPOConfig" in message and message.endswith("did you mean dpo.beta?")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ("stage=ppo", "+ppo.kl_coeff=0.2"),
            "ppo.kl_coeff=0.2: unknown key, not a field of rlhf.ppo.settings.PPOConfig; did you mean ppo.kl_coef?",
        ),
        (("+sft.learning_rat=0.1",), "sft.learning_rat=0.1: unknown key, not a field of trl.SFTConfig; did you mean sft.learning_rate?"),
        (("+peft.rank=4",), "peft.rank=4: unknown key, not a field of rlhf.models.lora_config"),
        (("+model.trust_remote=true",), "model.trust_remote=True: unknown key; did you mean model.trust_remote_code?"),
        (("+dataset.max_sample=5",), "dataset.max_sample=5: unknown key; did you mean dataset.max_samples?"),
        (
            ("+hardware.training_args.use_cpuu=true",),
            "hardware.training_args.use_cpuu=True: unknown key, not a field of trl.SFTConfig; did you mean hardware.training_args.use_cpu?",
        ),
        (("+sed=1",), "sed=1: unknown key; did you mean seed?"),
    ],
)
def test_unknown_keys_everywhere(overrides, expected):
    assert refused(compose_config(*overrides)).startswith(expected)


def test_fields_the_yaml_does_not_list_are_welcome():
    validate(compose_config("stage=dpo", "+dpo.adam_beta1=0.8", "+hardware.training_args.fp16=false"))
    validate(compose_config("stage=rm", "+rm.adam_epsilon=1e-6"))
    validate(compose_config("peft.bias=all"))


def test_command_line_typo_names_the_nearest_key():
    with pytest.raises(UserError, match=r"^dpo\.betta=0\.1: unknown key; did you mean dpo\.beta\?$"):
        check_command_line(["stage=dpo", "dpo.betta=0.1"])
    with pytest.raises(UserError, match=r"^stag=dpo: unknown key; did you mean stage\?$"):
        check_command_line(["stag=dpo"])
    with pytest.raises(UserError, match=r"^dop\.beta=0\.3: unknown key; did you mean dpo\.beta\?$"):
        check_command_line(["dop.beta=0.3"])
    with pytest.raises(UserError, match=r"^model\.name_or_pth=x: unknown key; did you mean model\.name_or_path\?$"):
        check_command_line(["model.name_or_pth=x"])


def test_command_line_field_missing_from_the_yaml_says_to_add_it():
    expected = r"dpo\.adam_beta1=0\.9: .*field of rlhf\.dpo_trainer\.KLDPOConfig.*use \+dpo\.adam_beta1=\.\.\.\)$"
    with pytest.raises(UserError, match=expected):
        check_command_line(["stage=dpo", "dpo.adam_beta1=0.9"])


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["stage=dpo", "dpo.beta=0.3", "peft.r=8"],
        ["-m", "stage=dpo", "dpo.beta=0.1,0.3"],
        ["stage=dpo", "dpo.loss_type=[sigmoid,ipo]", "dpo.loss_type.0=hinge"],
        ["experiment=rlhf_chain", "ppo.kl_coef=0.05", "sft.max_steps=2"],
        ["sweeps=dpo_optuna", "objective=eval_loss"],
        ["model=qwen3-0.6b", "dataset=hh_rlhf", "dataset.path=/x", "quantization=4bit", "logger=wandb", "logger.project=p"],
        ["hydra.run.dir=/tmp/x", "hydra.job.chdir=false", "seed=1", "hardware.training_args.use_cpu=false"],
        ["+dpo.betta=1"],  # adding is Hydra's business; validate() judges the added key
        ["--cfg", "job", "stage=dpo"],
        ["--help", "dpo.betta=1"],  # Hydra prints help and ignores overrides
    ],
)
def test_valid_command_lines_pass(argv):
    check_command_line(argv)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["stage=dpoo"], "stage=dpoo: no stage config named dpoo; did you mean stage=dpo? options: chain, dpo, eval, grpo, ppo, rloo"),
        (["dpo.beta=0.3"], "dpo.beta=0.3: unknown key; this config has no dpo node (stage=dpo brings it)"),
        (["~sft.nothing"], "~sft.nothing: sft.nothing is not in this config; nothing to delete"),
        (["+sft.learning_rate=1"], "+sft.learning_rate=1: sft.learning_rate is already in the config; set it without the +"),
        (["-m", "stage=dpo", "dpo.betta=0.1,0.3"], "dpo.betta=0.1: unknown key; did you mean dpo.beta?"),  # a sweep's first job
        (["dpo.beta=(broken"], "Error parsing override 'dpo.beta=(broken'"),
    ],
)
def test_composition_errors_become_one_line(argv, expected):
    with pytest.raises(UserError) as caught:
        check_command_line(argv)
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)


# ---- 2. values out of range -----------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (("stage=dpo", "dpo.beta=-1"), "dpo.beta=-1: must be > 0"),
        (("stage=dpo", "dpo.beta=0"), "dpo.beta=0: must be > 0"),
        (("stage=dpo", "dpo.beta=abc"), "dpo.beta=abc: must be a number > 0"),
        (("stage=dpo", "dpo.label_smoothing=0.5"), "dpo.label_smoothing=0.5: must be in [0, 0.5)"),
        (("stage=dpo", "dpo.label_smoothing=-0.1"), "dpo.label_smoothing=-0.1: must be in [0, 0.5)"),
        (("stage=dpo", "dpo.kl_coef=-0.1"), "dpo.kl_coef=-0.1: must be >= 0"),
        (("peft.r=0",), "peft.r=0: must be an integer >= 1"),
        (("sft.learning_rate=0",), "sft.learning_rate=0: must be > 0"),
        (("stage=rm", "rm.learning_rate=-1e-5"), "rm.learning_rate=-1e-05: must be > 0"),
        (("sft.per_device_train_batch_size=0",), "sft.per_device_train_batch_size=0: must be an integer >= 1"),
        (("stage=dpo", "dpo.per_device_eval_batch_size=0"), "dpo.per_device_eval_batch_size=0: must be an integer >= 1"),
        (("sft.gradient_accumulation_steps=0",), "sft.gradient_accumulation_steps=0: must be an integer >= 1"),
        (("sft.max_length=0",), "sft.max_length=0: must be an integer >= 1 (or null)"),
        (("stage=ppo", "ppo.batch_size=0"), "ppo.batch_size=0: must be an integer >= 1"),
        (("stage=ppo", "ppo.mini_batch_size=0"), "ppo.mini_batch_size=0: must be an integer >= 1"),
        (("stage=ppo", "ppo.batch_size=30"), "ppo.batch_size=30: must be a multiple of ppo.mini_batch_size=8"),
        (
            ("stage=ppo", "model=smollm2-135m", "ppo.batch_size=1", "ppo.mini_batch_size=1"),
            "ppo.batch_size=1: PPO whitens each update's advantages and, with ppo.whiten_scores=true, its scores over the batch, "
            "which needs at least 2 answers",
        ),
        (  # advantages are whitened whatever ppo.whiten_scores says: a one-token answer failed mid-run
            ("stage=ppo", "ppo.batch_size=1", "ppo.mini_batch_size=1", "ppo.whiten_scores=false", "ppo.max_new_tokens=1"),
            "ppo.batch_size=1: PPO whitens each update's advantages over the batch, which needs at least 2 answers",
        ),
        (
            ("peft=none", "hardware.dtype=bfloat16"),
            "hardware.dtype=bfloat16 with peft=none: every weight would train in bfloat16, where AdamW's small updates round away; "
            "train whole models in float32 weights (hardware.dtype=float32, with hardware.training_args.bf16=true for bfloat16 compute)",
        ),
        (("stage=ppo", "ppo.learning_rate=0"), "ppo.learning_rate=0: must be > 0"),
        (("stage=ppo", "ppo.kl_coef=-1"), "ppo.kl_coef=-1: must be >= 0"),
        (("stage=ppo", "ppo.cliprange=0"), "ppo.cliprange=0: must be > 0"),
        (("stage=ppo", "ppo.cliprange_value=-0.2"), "ppo.cliprange_value=-0.2: must be > 0"),
        (("stage=ppo", "ppo.gamma=1.5"), "ppo.gamma=1.5: must be in [0, 1]"),
        (("stage=ppo", "ppo.lam=-0.1"), "ppo.lam=-0.1: must be in [0, 1]"),
        (("stage=ppo", "ppo.temperature=0"), "ppo.temperature=0: must be > 0"),
        (
            ("stage=ppo", "+ppo.top_p=0.9"),
            "ppo.top_p=0.9: must be 1.0: the log-probs and KL are those of the whole tempered softmax; lower the temperature instead",
        ),
        (
            ("stage=eval", "+eval.top_p=0.5"),
            "eval.top_p=0.5: must be 1.0: the log-probs and KL are those of the whole tempered softmax; lower the temperature instead",
        ),
        (("dataset.test_size=-0.1",), "dataset.test_size=-0.1: must be >= 0: a fraction below 1 or a count of rows"),
        (("dataset.test_size=1.5",), "dataset.test_size=1.5: must be >= 0: a fraction below 1 or a count of rows"),
        (("stage=eval", "eval.temperature=-0.5"), "eval.temperature=-0.5: must be >= 0 (0 = greedy decoding)"),
        (("experiment=rlhf_chain", "ppo.kl_coef=-1"), "ppo.kl_coef=-1: must be >= 0"),  # a chain's shared settings
    ],
)
def test_values_out_of_range(overrides, expected):
    assert refused(compose_config(*overrides)) == expected


def test_values_at_the_edges_pass(tmp_path):
    rm = fake_run(tmp_path / "rm", "rm")
    validate(compose_config("stage=dpo", "dpo.label_smoothing=0.49", "dpo.kl_coef=0", "dpo.beta=1e-3", "dataset.test_size=0"))
    validate(compose_config("sft.max_length=null", "dataset.test_size=20", "peft.r=1"))
    sft = fake_run(tmp_path / "sft", "sft")
    validate(compose_config("stage=eval", f"eval.policy={sft}", f"eval.reward_model={rm}", "eval.temperature=0"))  # greedy
    for edge in ("+ppo.top_p=1", "ppo.gamma=0", "ppo.gamma=1", "ppo.lam=1", "ppo.kl_coef=0", "ppo.batch_size=8"):
        validate(compose_config("stage=ppo", f"ppo.reward_model={rm}", edge))


# ---- 3. incompatible choices, and the runs a stage starts from --------------------------------


def test_lora_bias_is_refused_where_the_reference_is_the_disabled_adapter():
    for stage in ("dpo", "ppo", "grpo", "rloo"):
        message = refused(compose_config(f"stage={stage}", "peft.bias=lora_only"))
        assert message.startswith(f"peft.bias=lora_only with stage={stage}: the reference is the policy with its LoRA adapter disabled")
    validate(compose_config("stage=grpo", "peft.bias=all", "grpo.beta=0", "experiment=grpo_arithmetic"))  # no KL term, no reference
    validate(compose_config("stage=sft", "peft.bias=all"))  # no reference at all
    validate(compose_config("stage=dpo", "peft=none"))


def test_quantization_needs_lora():
    message = refused(compose_config("quantization=4bit", "peft=none"))
    assert message.startswith("quantization=4bit with peft=none: quantized weights cannot be trained directly")
    assert "peft=lora" in message
    assert refused(compose_config("quantization=8bit", "peft=none")).startswith("quantization=8bit with peft=none")
    validate(compose_config("quantization=4bit", "peft=lora"))


def test_ppo_needs_a_finished_reward_model_run(tmp_path):
    assert refused(compose_config("stage=ppo")) == (
        "ppo.reward_model=null: stage=ppo needs ppo.reward_model=<directory of a finished stage=rm run>"
    )
    nowhere = tmp_path / "nowhere"
    assert refused(compose_config("stage=ppo", f"ppo.reward_model={nowhere}")).startswith(
        f"ppo.reward_model={nowhere}: not a run directory"
    )
    unfinished = fake_run(tmp_path / "unfinished", "rm", finished=False)
    assert "that run did not finish" in refused(compose_config("stage=ppo", f"ppo.reward_model={unfinished}"))
    sft = fake_run(tmp_path / "sft", "sft")
    assert "that is a stage=sft run; expected one of: rm" in refused(compose_config("stage=ppo", f"ppo.reward_model={sft}"))
    rm = fake_run(tmp_path / "rm", "rm")
    validate(compose_config("stage=ppo", f"ppo.reward_model={rm}", f"model.init_from={sft}"))


def test_eval_needs_a_finished_policy_and_reward_model_run(tmp_path):
    sft, rm = fake_run(tmp_path / "sft", "sft"), fake_run(tmp_path / "rm", "rm")
    assert refused(compose_config("stage=eval", f"eval.reward_model={rm}")) == (
        "eval.policy=null: stage=eval needs eval.policy=<directory of a finished stage=sft/dpo/ppo/grpo/rloo run>"
    )
    assert "that is a stage=sft run; expected one of: rm" in refused(
        compose_config("stage=eval", f"eval.policy={sft}", f"eval.reward_model={sft}")
    )


def test_an_unknown_hub_is_refused_before_anything_loads():
    assert refused(compose_config("model.hub=modelscop")).startswith("model.hub=modelscop: unknown hub")


def test_init_from_must_be_a_finished_run(tmp_path):
    nowhere = tmp_path / "nowhere"
    assert refused(compose_config("stage=dpo", f"model.init_from={nowhere}")) == (
        f"model.init_from={nowhere}: not a run directory (no .hydra/config.yaml there)"
    )
    unfinished = fake_run(tmp_path / "unfinished", "sft", finished=False)
    assert refused(compose_config("stage=dpo", f"model.init_from={unfinished}")).startswith(
        f"model.init_from={unfinished}: that run did not finish"
    )
    validate(compose_config("stage=dpo", f"model.init_from={fake_run(tmp_path / 'sft', 'sft')}"))


def test_tiny_hyperparameters_are_refused_for_any_other_model(tmp_path):
    """model=tiny (the default) brings the tiny model's learning rates: a real model named by
    path, or reached through model.init_from, must come with its own model config."""
    message = refused(compose_config("stage=dpo", "model.name_or_path=/models/qwen"))
    assert message.startswith("model.name_or_path=/models/qwen: the stage defaults in use are tuned for builtin:tiny")
    assert "model=custom" in message
    validate(compose_config("stage=dpo", "model=custom", "model.name_or_path=/models/qwen"))
    smollm2_sft = fake_run(tmp_path / "sft", "sft", model="builtin:smollm2-135m")
    assert refused(compose_config("stage=dpo", f"model.init_from={smollm2_sft}")).startswith(
        "model.name_or_path=builtin:smollm2-135m: the stage defaults in use are tuned for builtin:tiny"
    )
    validate(compose_config("stage=dpo", "model=smollm2-135m", f"model.init_from={smollm2_sft}"))


def test_chain_steps_are_not_checked_as_a_whole():
    validate(compose_config("experiment=rlhf_chain"))  # ppo.reward_model comes with the step (@rm)


# ---- 4. the _target_ allowlist ----------------------------------------------------------------

REFUSAL = (
    "only rlhf., trl., peft., transformers., torch.optim. and Hydra plugin targets are instantiated "
    "(your own module's: RLHF_ALLOW_TARGETS=<module>. in the command's environment, docs/layout.md)"
)


def test_foreign_target_in_a_hand_made_config_is_refused():
    cfg = OmegaConf.create({"stage": "sft", "evil": {"_target_": "os.system", "_args_": ["echo hi"]}})
    assert refused(cfg) == f"refusing _target_=os.system at evil._target_: {REFUSAL}"


@pytest.mark.parametrize(
    "target, reason",
    [
        ("builtins.eval", REFUSAL),
        ("subprocess.run", REFUSAL),
        ("rlhfx.thing", REFUSAL),
        ("rlhf.command.subprocess.run", "it resolves to an object of subprocess"),  # an allowed prefix, a foreign module
        ("rlhf.dpo_trainer.torch.load", "it resolves to an object of torch"),
        ("rlhf.command.main.__globals__", "dunder attributes"),
    ],
)
def test_foreign_targets_are_refused_wherever_they_sit(target, reason):
    cfg = compose_config("stage=dpo")
    with open_dict(cfg):
        cfg.dpo._target_ = target
    message = refused(cfg)
    assert message.startswith(f"refusing _target_={target} at dpo._target_: ") and reason in message
    cfg = compose_config()
    with open_dict(cfg):
        cfg.sft.callbacks = [{"_target_": target}]  # nested in a list, too
    assert refused(cfg).startswith(f"refusing _target_={target} at sft.callbacks[0]._target_")


def test_interpolated_target_is_checked_resolved(monkeypatch):
    monkeypatch.setenv("RLHF_TEST_TARGET", "os.system")
    cfg = compose_config()
    with open_dict(cfg):
        cfg.sft._target_ = "${oc.env:RLHF_TEST_TARGET}"
    assert refused(cfg).startswith("refusing _target_=os.system at sft._target_")


@pytest.mark.parametrize(
    "target",
    [
        "trl.DPOConfig",
        "rlhf.dpo_trainer.KLDPOConfig",
        "rlhf.trainers.KLDPOConfig",  # the name saved configs used before
        "torch.optim.AdamW",
        "transformers.BitsAndBytesConfig",
        "peft.LoraConfig",
    ],
)
def test_allowed_targets_pass(target):
    check_target(target, "x._target_")


# ---- the command line (needs the wiring in train.py and rlhf/command.py) ----------------------------


def one_line_error(done) -> str:
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (("stage=dpo", "dpo.betta=0.1"), "error: dpo.betta=0.1: unknown key; did you mean dpo.beta?"),  # train.py wiring
        (("stage=dpo", "dpo.beta=-1"), "error: dpo.beta=-1: must be > 0"),  # run.py wiring
    ],
)
def test_cli_mistakes_fail_fast_with_one_line(tmp_path, args, expected):
    start = time.perf_counter()
    try:
        done = cli(*args, f"hydra.run.dir={tmp_path}", timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"train.py {' '.join(args)} ran on: is validate() wired into rlhf.command?")
    seconds = time.perf_counter() - start
    assert one_line_error(done) == expected
    assert seconds < 5, f"{seconds:.1f} s"
    assert not (tmp_path / "env.json").exists()  # nothing ran


def test_cli_refuses_a_shared_config_with_a_foreign_target(tmp_path):
    """A saved config re-run with --config-path: the PPO stage instantiates cfg.ppo first thing,
    so without the check this would run `touch`."""
    marker = tmp_path / "pwned"
    job = compose_config("stage=ppo")
    saved = OmegaConf.to_container(OmegaConf.masked_copy(job, [key for key in job if key != "hydra"]), resolve=False)
    saved["ppo"] = {"_target_": "os.system", "_args_": [f"touch {marker}"]}
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "config.yaml").write_text(yaml.safe_dump(saved))
    done = cli("--config-path", str(shared), "--config-name", "config", f"hydra.run.dir={tmp_path / 'run'}", timeout=60)
    assert one_line_error(done) == f"error: refusing _target_=os.system at ppo._target_: {REFUSAL}"
    assert not marker.exists()


@pytest.mark.parametrize("target", ["os.system", "shutil.rmtree"])
def test_cli_refuses_a_foreign_callback_before_hydra_instantiates_it(tmp_path, target):
    """hydra.callbacks are instantiated by Hydra before the run starts: a config named with
    --config-path is checked before Hydra reads it."""
    marker = tmp_path / "pwned"
    shared = tmp_path / "shared"
    shared.mkdir()
    config = {"defaults": ["_self_"], "hydra": {"callbacks": {"evil": {"_target_": target, "_args_": [f"touch {marker}"]}}}}
    (shared / "config.yaml").write_text(yaml.safe_dump(config))
    done = cli("--config-path", str(shared), "--config-name", "config", f"hydra.run.dir={tmp_path / 'run'}", timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: refusing _target_={target} at hydra.callbacks.evil._target_")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_cli_refuses_a_foreign_callback_target_on_the_command_line(tmp_path):
    done = cli("+hydra.callbacks.evil._target_=os.system", f"hydra.run.dir={tmp_path / 'run'}", timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: refusing _target_=os.system at hydra.callbacks.evil._target_")


def test_a_command_with_three_mistakes_hears_of_all_three(tmp_path):
    """Validation collects: three values out of range in three groups print three lines, each
    naming its key, and nothing runs; one mistake still prints one line."""
    done = cli("stage=dpo", "dpo.beta=-1", "dataset.test_size=-2", "peft.r=0", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), lines
    assert [line.split("=")[0] for line in lines] == ["error: dpo.beta", "error: peft.r", "error: dataset.test_size"]
    assert not (tmp_path / "run" / "final").exists()
    one = cli("stage=dpo", "dpo.beta=-1", f"hydra.run.dir={tmp_path / 'one'}", timeout=120)
    assert one.stderr.strip().splitlines() == ["error: dpo.beta=-1: must be > 0"]
