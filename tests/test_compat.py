"""The private library attributes `rlhf/compat.py` relies on are still where it expects them in
the installed versions. A failure names the attribute, the library version and what to update,
before any training test fails in a less readable way."""

import inspect
from importlib import metadata
from importlib import util as importlib_util

import pytest

from rlhf.compat import PRIVATE_ATTRIBUTES, hydra_arguments


def moved(what: str, package: str) -> str:
    return f"{what} is gone in {package} {metadata.version(package)}: update rlhf/compat.py (and its PRIVATE_ATTRIBUTES)"


@pytest.mark.slow
def test_the_trainer_counters_are_set_by_the_training_loop():
    from transformers import Trainer

    source = inspect.getsource(Trainer)
    for name in PRIVATE_ATTRIBUTES["transformers.Trainer (instance, after train())"]:
        assert f"self.{name} =" in source or f"self.{name} +=" in source, moved(f"transformers.Trainer.{name}", "transformers")
    assert callable(getattr(Trainer, "_prepare_inputs", None)), moved("transformers.Trainer._prepare_inputs", "transformers")


@pytest.mark.parametrize("trainer", ["SFTTrainer", "RewardTrainer"])
def test_trl_counts_trained_tokens_where_compat_reads_them(trainer):
    import trl

    source = inspect.getsource(getattr(trl, trainer))
    assert "self._total_train_tokens" in source, moved(f"trl.{trainer}._total_train_tokens", "trl")


def test_trl_dpo_reference_pass_and_metrics_are_where_compat_hooks_in():
    from trl import DPOTrainer

    hook = getattr(DPOTrainer, "_precompute_ref_logps", None)
    assert callable(hook), moved("trl.DPOTrainer._precompute_ref_logps", "trl")
    assert list(inspect.signature(hook).parameters) == ["self", "dataset", "name", "batch_size"], moved(
        "the signature (self, dataset, name, batch_size) of trl.DPOTrainer._precompute_ref_logps", "trl"
    )
    assert "self._metrics = " in inspect.getsource(DPOTrainer), moved("trl.DPOTrainer._metrics", "trl")


def test_hydra_parses_the_flags_train_py_reads():
    args = hydra_arguments(["-m", "--config-path", "x", "--config-name", "y", "stage=dpo"])
    assert (args.multirun, args.config_path, args.config_name, args.overrides) == (True, "x", "y", ["stage=dpo"]), moved(
        "hydra._internal.utils.get_args_parser's flags", "hydra-core"
    )
    for flag in ("help", "hydra_help", "info", "shell_completion", "experimental_rerun", "config_dir"):
        assert hasattr(args, flag), moved(f"Hydra's --{flag.replace('_', '-')} flag", "hydra-core")


def test_trl_fused_head_scores_only_the_labelled_positions_on_cpu_with_the_same_log_probs(monkeypatch):
    import torch
    import trl.trainer.utils as trl_utils
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.compat import score_labelled_positions_on_cpu

    role = "trl.trainer.utils._use_triton's role in add_fused_lm_head"
    assert "compact = _use_triton(" in inspect.getsource(trl_utils.add_fused_lm_head), moved(role, "trl")
    from trl.kernels import chunked_logprob

    # TRL's own choice (an earlier training in this process may have made the CPU's already), put back after the test
    monkeypatch.setattr(trl_utils, "_use_triton", chunked_logprob._use_triton)
    scored_rows = []

    class Spy:  # records how many positions the LM head scores
        @staticmethod
        def apply(hidden, *args):
            scored_rows.append(hidden.shape[0])
            return chunked.apply(hidden, *args)

    chunked = trl_utils._ChunkedLogProbFunction
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Spy)
    torch.manual_seed(0)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config = LlamaConfig(vocab_size=300, **sizes)
    model = LlamaForCausalLM(config).eval()
    trl_utils.add_fused_lm_head(model)
    ids = torch.randint(0, 300, (2, 12))
    labels = ids.masked_fill(torch.arange(12) < 7, -100)  # a 7-token prompt, a 5-token completion
    every_position = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    score_labelled_positions_on_cpu()
    labelled_only = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    assert scored_rows == [2 * 11, 2 * 5]
    torch.testing.assert_close(labelled_only, every_position)
    assert labelled_only[:, 6:].abs().min() > 0 and labelled_only[:, :6].abs().max() == 0


def test_a_full_disk_is_recognised_in_every_form_a_save_reports_it():
    import errno

    from rlhf.compat import out_of_space

    assert out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:  # a C++ or Rust writer's own exception, raised while Python's write failed
        try:
            raise OSError(errno.ENOSPC, "x")
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from inner
    except RuntimeError as wrapped:
        assert out_of_space(wrapped)
    assert not out_of_space(OSError(errno.EACCES, "Permission denied")) and not out_of_space(RuntimeError("file write failed"))


@pytest.mark.parametrize(
    "override, expected",
    [
        ("stage=dpoo", ("no_option", "stage", "dpoo")),
        ("dpo.betta=0.1", ("unknown_key", "dpo.betta", None)),
        ("~dpo.betta", ("not_in_config", "dpo.betta", None)),
        ("+dpo.beta=0.2", ("already_set", "dpo.beta", None)),
    ],
)
def test_hydra_composition_errors_say_what_compat_reads(override, expected):
    """Hydra's own exception for each kind of bad override, read by `hydra_override_error`: a
    reworded message fails here, not as a traceback in a user's terminal."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlhf import PROJECT_ROOT
    from rlhf.compat import hydra_override_error

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        with pytest.raises(Exception) as raised:
            compose("config", overrides=["stage=dpo", override])
    assert hydra_override_error(str(raised.value)) == expected, f"{moved('composition error text', 'hydra-core')}: {raised.value}"


def test_the_cpu_kernel_fallback_of_bitsandbytes_is_not_reported_but_other_messages_are(caplog):
    """On CPUs with AVX512-BF16, importing bitsandbytes (peft does, on every command) logged that it
    could not fetch a hub kernel (and, offline, that it skipped the kernel's trust check), then fell
    back to its own CPU code: noise on every command."""
    import logging

    from rlhf.compat import QUIET_LOG_MESSAGES

    for logger_name, text in QUIET_LOG_MESSAGES:
        module = logger_name if importlib_util.find_spec(logger_name.split(".")[0]) else None
        if module is not None:  # the text compat drops is the installed version's
            source = open(importlib_util.find_spec(module).origin, encoding="utf-8").read()
            assert text.split("'")[0] in source, (logger_name, metadata.version(module.split(".")[0]))
        logger = logging.getLogger(logger_name)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            logger.warning(f"{text}: %s.", "details")
            logger.warning("another message")
        assert [record.getMessage() for record in caplog.records if record.name == logger_name] == ["another message"]
