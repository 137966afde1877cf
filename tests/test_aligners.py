"""`experiment=compare_aligners` on the tiny default, shortened: SFT and two reward models once,
then DPO, PPO, GRPO and RLOO from the SFT policy at one budget, each judged against it by the
proxy and by the judge reward model; the comparison's files; a second run skips every step."""

import csv
import json

import pytest
from conftest import train

STEPS = ("sft", "rm", "judge", "dpo", "ppo", "grpo", "rloo", "eval_dpo", "eval_ppo", "eval_grpo", "eval_rloo")


@pytest.mark.slow
def test_compare_aligners_leaves_its_table_frontier_and_report_and_resumes(tmp_path, capsys):
    overrides = ("experiment=compare_aligners", "sft.max_steps=30", "rm.max_steps=30", "chain.budget.updates=3", "eval.num_prompts=16")
    train(tmp_path, *overrides)
    rows = {row["stage"]: row for row in csv.DictReader((tmp_path / "compare_aligners.csv").open())}
    assert set(rows) == {"dpo", "ppo", "grpo", "rloo"}
    for row in rows.values():
        for column in ("proxy_win_rate", "judge_win_rate"):
            assert 0 <= float(row[column]) <= 1
        for column in ("proxy_score", "judge_score", "kl", "length", "wall_seconds", "proxy_gain", "judge_gain"):
            float(row[column])  # a number
        for column in ("proxy_gain_lc", "judge_gain_lc", "length_change"):  # the gains at equal answer length
            float(row[column])
    assert (tmp_path / "frontier.png").stat().st_size > 1000
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "reward-KL frontier" in page and "https://" not in page
    sft = {(row["proxy_score_sft"], row["judge_score_sft"]) for row in rows.values()}
    assert len(sft) == 1  # the SFT policy's answers are the same ones in every judging step
    # the judge trained on rows the proxy and the policies never saw
    assert "skip_rows: 400" in (tmp_path / "judge" / ".hydra" / "config.yaml").read_text()
    assert "max_samples: 400" in (tmp_path / "rm" / ".hydra" / "config.yaml").read_text()

    stamps = {step: (tmp_path / step / "metrics.json").stat().st_mtime_ns for step in STEPS}
    capsys.readouterr()
    train(tmp_path, *overrides)
    assert "already finished with this config; skipped" in capsys.readouterr().out  # a finished comparison: nothing runs
    assert stamps == {step: (tmp_path / step / "metrics.json").stat().st_mtime_ns for step in STEPS}
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "done"
