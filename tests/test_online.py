"""GRPO and RLOO on TRL's trainers (`rlhf.online`), on the tiny default: they raise the held-out
reward-model score from the SFT policy, train on a verifiable reward alone, chain after SFT and
RM, resume after a crash, and refuse what cannot work in one line."""

import json

import pytest
from conftest import ROOT, assert_same_metrics, compose_config, history, train, train_through_a_crash
from omegaconf import OmegaConf

from rlhf.errors import UserError
from rlhf.lineage import Lineage
from rlhf.rewards import AnswerMatch, LengthPenalty
from rlhf.validate import check_vllm, validate

ONLINE_LOG_KEYS = ("reward", "kl", "completions/mean_length", "clip_ratio/region_mean", "rewards/reward_model/mean")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_online_stage_raises_the_held_out_score_of_the_reward_model(stage, rlhf_chain, tmp_path):
    chain_dir, _ = rlhf_chain
    run_dir = tmp_path / stage
    metrics = train(run_dir, f"stage={stage}", f"model.init_from={chain_dir / 'sft'}", f"{stage}.reward_model={chain_dir / 'rm'}")
    assert metrics["eval_scores"] > metrics["eval_scores_before"] + 0.5, metrics
    for key in ONLINE_LOG_KEYS:
        assert key in metrics, key
        assert len(history(run_dir, key)) == 30, key  # one history line per update (logging_steps=1)
    for name in ("metrics.json", "history.jsonl", "env.json", ".hydra/config.yaml", "final/adapter_config.json", "final/lineage.json"):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "status.json").read_text())["status"] == "done"
    rewards = history(run_dir, "reward")
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5  # the training reward rises too


def test_verifiable_reward_alone_trains_and_is_logged(rlhf_chain, tmp_path):
    chain_dir, _ = rlhf_chain
    cut_at = 23  # tokens: the built-in arithmetic prompts template to 21-24 tokens, so some are cut (counted below)
    metrics = train(
        tmp_path,
        "experiment=grpo_arithmetic",
        f"model.init_from={chain_dir / 'sft'}",
        "grpo.max_steps=6",
        f"grpo.max_prompt_length={cut_at}",
    )
    assert len(history(tmp_path, "rewards/answer_match/mean")) == 6
    assert len(history(tmp_path, "rewards/length_penalty/mean")) == 6
    assert "eval_scores" not in metrics  # no reward model: no held-out reward-model score
    # ... but every reward function scores the held-out answers before and after, paired:
    pairs = metrics["eval_answer_match_score_pairs"]
    assert pairs == 30  # the 10% held out of the 300 built-in prompts, all with an answer
    before, after = metrics["eval_answer_match_scores_before"], metrics["eval_answer_match_scores"]
    for accuracy in (before, after):  # a share of the held-out prompts answered right
        assert 0 <= accuracy <= 1 and abs(accuracy * pairs - round(accuracy * pairs)) < 1e-9
    assert metrics["eval_answer_match_score_gain"] == pytest.approx(after - before)
    low, high = metrics["eval_answer_match_score_gain_ci95"]
    assert low <= metrics["eval_answer_match_score_gain"] <= high
    assert metrics["eval_length_penalty_scores_before"] <= 0 and metrics["eval_length_penalty_scores"] <= 0
    assert (tmp_path / "final" / "adapter_config.json").is_file()
    # Every prompt longer than grpo.max_prompt_length was cut (TRL would have sampled from it whole):
    tokenizer = Lineage.of(compose_config().model).tokenizer()
    rows = [json.loads(line) for line in (ROOT / "rlhf/data/builtin/arithmetic/arithmetic_zh.jsonl").read_text().splitlines()]
    longer = [row for row in rows if templated_length(tokenizer, [{"role": "user", "content": row["prompt"]}]) > cut_at]
    assert 0 < len(longer) < len(rows) and metrics["data/cut_prompts"] == len(longer)


def test_eval_prompts_0_trains_without_held_out_scoring(rlhf_chain, tmp_path):
    """`eval_prompts=0`: no held-out answers sampled before or after (stage=eval can measure the
    gain afterwards); a negative count is refused in one line, for PPO too."""
    chain_dir, _ = rlhf_chain
    sft = f"model.init_from={chain_dir / 'sft'}"
    metrics = train(tmp_path, "experiment=grpo_arithmetic", sft, "grpo.max_steps=2", "grpo.eval_prompts=0")
    assert len(history(tmp_path, "rewards/answer_match/mean")) == 2
    assert not [key for key in metrics if key.startswith("eval_")]
    validate(compose_config("stage=ppo", f"ppo.reward_model={chain_dir / 'rm'}", "ppo.eval_prompts=0"))
    with pytest.raises(UserError, match=r"^ppo.eval_prompts=-1: must be an integer >= 0 \(0 = no held-out scoring\)$"):
        validate(compose_config("stage=ppo", f"ppo.reward_model={chain_dir / 'rm'}", "ppo.eval_prompts=-1"))


def templated_length(tokenizer, messages: list) -> int:
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_a_long_conversation_is_cut_to_the_prompt_length_from_its_start():
    from rlhf.generation import fit_prompt

    tokenizer = Lineage.of(compose_config().model).tokenizer()
    system = {"role": "system", "content": "你是助手。"}
    turns = [
        {"role": "user", "content": "第一个问题：" + "天气" * 30},
        {"role": "assistant", "content": "回答" * 30},
        {"role": "user", "content": "最后的问题：" + "请计算一加一等于几" * 6},
    ]
    conversation = [system, *turns]
    assert fit_prompt(conversation, tokenizer, 10_000) is conversation  # a prompt that fits is left alone
    without_first = fit_prompt(conversation, tokenizer, templated_length(tokenizer, [system, turns[2]]))
    assert without_first == [system, turns[2]]  # the oldest turns went (not the system message); it starts at a user turn
    with_system = templated_length(tokenizer, [system, {"role": "user", "content": ""}])  # the least a kept system message costs
    for limit in (with_system + 8, with_system - 1):
        cut = fit_prompt(conversation, tokenizer, limit)
        assert templated_length(tokenizer, cut) <= limit
        assert cut[:-1] == ([system] if limit >= with_system else [])  # the system message stays while it leaves room
        assert turns[2]["content"].endswith(cut[-1]["content"]) and cut[-1]["content"]  # the end of the last question stays
    with pytest.raises(UserError, match="leaves no room"):
        fit_prompt(conversation, tokenizer, 2)


@pytest.mark.slow
def test_grpo_chain_leaves_complete_step_directories(tmp_path):
    metrics = train(tmp_path, "experiment=grpo_chain", "sft.max_steps=20", "rm.max_steps=20", "grpo.max_steps=4")
    for step in ("sft", "rm", "grpo"):
        for name in ("metrics.json", "history.jsonl", "env.json", ".hydra/config.yaml", "final"):
            assert (tmp_path / step / name).exists(), f"{step} lacks {name}"
    assert "grpo/eval_scores" in metrics and "grpo/eval_scores_before" in metrics


@pytest.mark.slow
def test_crashed_grpo_run_resumes_to_the_metrics_of_an_uninterrupted_one(rlhf_chain, tmp_path, monkeypatch):
    from trl import GRPOTrainer

    chain_dir, _ = rlhf_chain
    overrides = ("stage=grpo", f"model.init_from={chain_dir / 'sft'}", f"grpo.reward_model={chain_dir / 'rm'}")
    overrides += ("grpo.max_steps=8", "grpo.save_steps=4", "grpo.eval_prompts=16")
    whole = train(tmp_path / "whole", *overrides)

    resumed = train_through_a_crash(monkeypatch, GRPOTrainer, "training_step", 6, tmp_path / "crashed", *overrides)
    assert_same_metrics(resumed, whole, 1e-5)
    logged = [json.loads(line) for line in (tmp_path / "crashed" / "history.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged if "loss" in line] == list(range(1, 9))  # each update once, across the crash


def test_reward_functions_score_conversational_completions():
    completions = [[{"role": "assistant", "content": "3加4等于7。"}], [{"role": "assistant", "content": "等于8"}], "no number"]
    assert AnswerMatch()(prompts=[None] * 3, completions=completions, answer=["7", "7", "7"]) == [1.0, 0.0, 0.0]
    assert AnswerMatch()(prompts=[None], completions=["7"], answer=[""]) == [None]  # nothing to check against
    penalty = LengthPenalty(max_chars=5, per_char=0.5)
    assert penalty(prompts=[None, None], completions=["abc", "abcdefgh"]) == [0.0, -1.5]
    assert (AnswerMatch(weight=2).weight, AnswerMatch().__name__, penalty.__name__) == (2.0, "answer_match", "length_penalty")


def test_online_mistakes_fail_in_one_line(rlhf_chain, tmp_path, capsys):
    chain_dir, _ = rlhf_chain
    for overrides, expected in [
        (("stage=grpo",), "stage=grpo needs a reward: grpo.reward_model=<rm run> and/or grpo.reward_functions"),
        (
            ("experiment=grpo_arithmetic", "dataset=builtin_preference"),
            "grpo.reward_functions.answer: reads the dataset column 'answer', which this data lacks (prompt)",
        ),
        (("stage=rloo", f"rloo.reward_model={chain_dir / 'sft'}"), "that is a stage=sft run; expected one of: rm"),
    ]:
        with pytest.raises(SystemExit) as stop:
            train(tmp_path / "refused", *overrides)
        assert stop.value.code == 2
        assert expected in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_typo_in_a_reward_function_is_refused_with_the_nearest_argument():
    cfg = compose_config("experiment=grpo_arithmetic", "+grpo.reward_functions.answer.colum=answer")
    with pytest.raises(
        UserError, match=r"grpo\.reward_functions\.answer\.colum=answer: unknown key, not a field of rlhf\.rewards\.AnswerMatch"
    ):
        validate(cfg)


def test_vllm_is_refused_where_it_cannot_run():
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM can run here")
    with pytest.raises(UserError, match=r"^grpo\.use_vllm=true needs .*set grpo\.use_vllm=false"):
        check_vllm(OmegaConf.create({"stage": "grpo", "grpo": {"use_vllm": True}}))


USER_REWARD = '''
from rlhf.rewards import RewardFunction


class ShortAnswer(RewardFunction):
    """A user's own reward: shorter answers score higher."""

    name = "short_answer"

    def score(self, text, index, columns):
        return -len(text) / 100
'''


@pytest.mark.slow
def test_a_users_own_reward_function_trains_grpo_only_with_the_opt_in(tmp_path):
    """A reward function in the user's module (outside the package) trains GRPO when the command
    allows its module (RLHF_ALLOW_TARGETS); without it the same _target_ is refused in one line,
    on the command line and in a config file alike - a saved run's config re-run elsewhere cannot
    allow its own targets."""
    import os
    import subprocess
    import sys

    (tmp_path / "userrewards.py").write_text(USER_REWARD)
    run_dir = tmp_path / "run"
    command = [sys.executable, "train.py", "experiment=grpo_arithmetic", "grpo.max_steps=2", "grpo.eval_prompts=0", "grpo.save_strategy=no"]
    command += ["+grpo.reward_functions.short._target_=userrewards.ShortAnswer", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def run(*args, allowed: str | None = None):
        granted = {**env, "RLHF_ALLOW_TARGETS": allowed} if allowed else {k: v for k, v in env.items() if k != "RLHF_ALLOW_TARGETS"}
        return subprocess.run([*args], cwd=ROOT, env=granted, capture_output=True, text=True, timeout=600)

    refused = run(*command)
    assert refused.returncode != 0 and not run_dir.exists()
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith("error: refusing _target_=userrewards.ShortAnswer at grpo.reward_functions.short._target_")
    assert "RLHF_ALLOW_TARGETS=<module>." in line  # how to allow it

    done = run(*command, allowed="userrewards.")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(history(run_dir, "rewards/short_answer/mean")) == 2  # TRL summed it with the shipped rewards and logged it

    saved = [sys.executable, "train.py", "--config-path", str(run_dir / ".hydra"), "--config-name", "config"]
    saved += [f"hydra.run.dir={tmp_path / 'again'}"]
    again = run(*saved)
    assert again.returncode != 0 and "refusing _target_=userrewards.ShortAnswer" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    bad = run(*command, allowed="userrewards")  # not a prefix ending in "."
    assert bad.returncode != 0 and "RLHF_ALLOW_TARGETS=userrewards: 'userrewards' is not a module prefix" in bad.stderr
