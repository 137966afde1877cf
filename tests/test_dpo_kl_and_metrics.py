"""DPO's explicit KL term, the preference metrics, and where they show up."""

import pytest
from conftest import compose_config, history, train

from rlhf.metrics import kendall_tau, preference_metrics, wilson_lower_bound


def test_win_rate_and_tau_by_hand():
    # three prompts, one pair each: two ranked right, one wrong -> win 2/3, tau = 2 * 2/3 - 1
    metrics = preference_metrics([2.0, 1.0, 0.0], [1.0, 0.5, 3.0], ["a", "b", "c"])
    assert metrics["win_rate"] == pytest.approx(2 / 3)
    assert metrics["kendall_tau"] == pytest.approx(1 / 3)
    assert metrics["pairs"] == 3


def test_tau_averages_over_prompts_with_several_ranked_pairs():
    # prompt a: a ranking of 3 answers gives 3 pairs, 2 concordant, 1 discordant -> tau 1/3;
    # prompt b: one concordant pair -> 1; a tie counts 0 and half a win.
    margins, prompts = [0.5, 0.2, -0.1, 1.0], ["a", "a", "a", "b"]
    assert kendall_tau(margins, prompts) == pytest.approx((1 / 3 + 1) / 2)
    assert preference_metrics([1.0], [1.0], ["x"])["win_rate"] == 0.5
    assert kendall_tau([0.0], ["x"]) == 0.0


def test_evaluation_groups_pairs_by_their_prompt():
    """The keys the trainers hand to kendall_tau: equal for pairs of the same prompt,
    distinct otherwise, and one per pair when prompts are absent."""
    from datasets import Dataset

    from rlhf.preference_eval import PreferenceEvaluation

    def user(text):
        return [{"role": "user", "content": text}]

    evaluation = PreferenceEvaluation()
    evaluation.eval_dataset = Dataset.from_list([{"prompt": user("a")}, {"prompt": user("b")}, {"prompt": user("a")}])
    keys = evaluation._prompt_keys(3)
    assert keys[0] == keys[2] != keys[1]
    assert kendall_tau([1.0, 1.0, -1.0], keys) == pytest.approx((0 + 1) / 2)  # not 2 * win_rate - 1 = 1/3
    evaluation.eval_dataset = Dataset.from_list([{"chosen": "x"}, {"chosen": "y"}])
    assert evaluation._prompt_keys(2) == [0, 1]


def plain_trl_dpo_losses(tmp_path, steps: int) -> list:
    """The same run as `stage=dpo dpo.max_steps=steps` built with trl.DPOTrainer itself."""
    from transformers import set_seed
    from trl import DPOTrainer

    from rlhf.context import RunContext
    from rlhf.lifecycle import load_inputs, trainer_kwargs

    cfg = compose_config("stage=dpo", f"dpo.max_steps={steps}", "dpo.logging_steps=1")
    set_seed(cfg.seed)
    context = RunContext.open(cfg, tmp_path)
    inputs = load_inputs(context, data_kind="preference")
    trainer = DPOTrainer(**{**trainer_kwargs(context, cfg.dpo, inputs), "callbacks": []})
    trainer.train()
    return [line["loss"] for line in trainer.state.log_history if "loss" in line]


def test_kl_coef_zero_is_exactly_trls_dpo_loss(tmp_path):
    ours = train(tmp_path / "ours", "stage=dpo", "dpo.max_steps=4", "dpo.logging_steps=1", "dpo.kl_coef=0")
    assert ours["train_loss"] > 0
    theirs = plain_trl_dpo_losses(tmp_path / "trl", steps=4)
    assert history(tmp_path / "ours", "loss") == pytest.approx(theirs, abs=1e-6)


@pytest.mark.parametrize("peft", ["lora", "none"])
def test_kl_term_is_logged_and_added(tmp_path, peft):
    """Both parts are logged; loss = dpo_loss + kl_coef * kl_loss; the KL starts at 0 (the
    policy is its reference before the first update) and grows; with peft=none the reference
    is TRL's explicit frozen copy."""
    train(tmp_path, "stage=dpo", f"peft={peft}", "dpo.max_steps=6", "dpo.logging_steps=1", "dpo.kl_coef=0.5", "dataset.test_size=0")
    loss, dpo_loss, kl_loss = history(tmp_path, "loss"), history(tmp_path, "dpo_loss"), history(tmp_path, "kl_loss")
    assert len(loss) == len(dpo_loss) == len(kl_loss) == 6
    for total, dpo, kl in zip(loss, dpo_loss, kl_loss):
        assert total == pytest.approx(dpo + 0.5 * kl, abs=1e-5)
    assert kl_loss[0] == pytest.approx(0.0, abs=1e-6)
    assert kl_loss[-1] > 1e-4


@pytest.mark.slow
def test_dpo_run_reports_win_rate_and_tau(tmp_path):
    metrics = train(tmp_path, "stage=dpo", "dpo.max_steps=20", "dpo.kl_coef=0.1")
    assert metrics["eval_win_rate"] >= 0.9
    assert metrics["eval_win_rate"] == pytest.approx(metrics["eval_rewards/accuracies"], abs=0.05)
    assert "eval_dpo_loss" in metrics and "eval_kl_loss" in metrics
    assert any("eval_win_rate" in line for line in history_lines(tmp_path))  # at every evaluation, not only the end


def history_lines(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def test_wilson_lower_bound_by_hand():
    # 60 of 100: p = 0.6, z = 1.96 -> (0.6 + 0.019208 - 1.96 * sqrt(0.0024 + 0.0000960)) / 1.038416
    assert wilson_lower_bound(60, 100) == pytest.approx(0.50200, abs=1e-4)
    assert wilson_lower_bound(55, 100) < 0.5 < wilson_lower_bound(70, 100)
    assert wilson_lower_bound(0, 10) == pytest.approx(0.0, abs=1e-12)
