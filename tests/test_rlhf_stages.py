"""Reward model, PPO and chains on the tiny default: the reward model separates held-out
pairs, PPO raises the reward model's score, chained stages start from (and stay close to)
the run before them."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ONE_SMALL_PPO_UPDATE, compose_config, crash_in_call, history, train
from safetensors.torch import load_file, save_file

from rlhf.cache import EVAL_REFERENCES, cache_dir
from rlhf.errors import UserError
from rlhf.runs import CHECKPOINT_MARK


def test_chain_leaves_complete_step_directories(rlhf_chain):
    run_dir, metrics = rlhf_chain
    for step in ("sft", "rm", "ppo"):
        for name in ("metrics.json", "history.jsonl", "env.json", ".hydra/config.yaml", "final"):
            assert (run_dir / step / name).exists(), f"{step} lacks {name}"
    assert (run_dir / "ppo" / "final" / "value_head.safetensors").is_file()
    saved = (run_dir / "ppo" / ".hydra" / "config.yaml").read_text()
    assert f"init_from: {run_dir / 'sft'}" in saved and f"reward_model: {run_dir / 'rm'}" in saved
    assert metrics["rm/eval_accuracy"] >= 0.9


def test_ppo_raises_the_reward_model_score_with_bounded_kl(rlhf_chain):
    run_dir, metrics = rlhf_chain
    scores = history(run_dir / "ppo", "objective/scores")
    tenth = max(1, len(scores) // 10)
    first, last = sum(scores[:tenth]) / tenth, sum(scores[-tenth:]) / tenth
    assert last > first + 0.5, scores
    assert metrics["ppo/eval_scores"] > metrics["ppo/eval_scores_before"]
    assert max(history(run_dir / "ppo", "objective/kl")) < 50  # nats per response: the policy stays near its reference
    for key in (
        "objective/entropy",
        "objective/kl_coef",
        "loss/policy",
        "loss/value",
        "policy/clipfrac",
        "policy/approxkl",
        "response_length",
    ):
        assert f"ppo/{key}" in metrics


def test_finished_steps_are_skipped(rlhf_chain, capsys):
    """A chain that broke (here: marked failed after its steps finished) is run again into the
    same directory: every step that finished with the same config is skipped."""
    run_dir, _ = rlhf_chain
    (run_dir / "status.json").write_text('{"status": "failed", "error": "interrupted"}')
    before = {step: (run_dir / step / "metrics.json").stat().st_mtime_ns for step in ("sft", "rm", "ppo")}
    train(run_dir, "experiment=rlhf_chain", "sft.max_steps=60", "rm.max_steps=60", "ppo.total_updates=30")
    assert "already finished" in capsys.readouterr().out
    assert before == {step: (run_dir / step / "metrics.json").stat().st_mtime_ns for step in ("sft", "rm", "ppo")}


def crash_ppo_in_update(monkeypatch, update: int) -> None:
    """Make PPO's optimisation step raise in `update` (counting from this call)."""
    from rlhf.ppo.trainer import PPOTrainer

    crash_in_call(monkeypatch, PPOTrainer, "optimise", update)


@pytest.mark.slow
def test_interrupted_ppo_resumes_to_the_metrics_of_an_uninterrupted_run(rlhf_chain, tmp_path, monkeypatch):
    """PPO checkpoints every ppo.save_steps updates; the same command after a crash goes on from
    the last one (weights, optimizer, KL coefficient, random state) and ends where an
    uninterrupted run ends. A crash before the first checkpoint starts over, logging no step twice."""
    chain_dir, _ = rlhf_chain
    overrides = (
        "stage=ppo",
        f"model.init_from={chain_dir / 'sft'}",
        f"ppo.reward_model={chain_dir / 'rm'}",
        "ppo.total_updates=5",
        "ppo.save_steps=2",
        "ppo.batch_size=8",
        "ppo.mini_batch_size=4",
        "ppo.ppo_epochs=2",
        "logger=tensorboard",
    )
    uninterrupted = train(tmp_path / "whole", *overrides)
    assert [p.name for p in (tmp_path / "whole" / "checkpoints").iterdir()] == ["checkpoint-4"]  # save_total_limit=1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "whole" / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("objective/scores")] == [1, 2, 3, 4, 5]  # PPO's own loop logs there too

    run_dir = tmp_path / "interrupted"
    for crash, logged in ((2, [1]), (4, [1, 2, 3])):  # before the first checkpoint, then after it
        with monkeypatch.context() as patch:
            crash_ppo_in_update(patch, crash)
            with pytest.raises(RuntimeError, match="simulated crash"):
                train(run_dir, *overrides)
        assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
        assert history(run_dir, "step") == logged

    resumed = train(run_dir, *overrides)
    assert history(run_dir, "step") == [1, 2, 3, 4, 5]  # update 3 again, and logged once
    for key, value in uninterrupted.items():
        if not key.startswith("time/") and key != "stage_runtime":
            assert resumed[key] == pytest.approx(value, abs=1e-5), key


def test_ppo_refuses_a_checkpoint_written_for_other_inputs(rlhf_chain, tmp_path, monkeypatch, capsys):
    """A checkpoint keeps the held-out scores sampled before training, which the final scores are
    paired with, and weights trained against one reward model: resuming it on other prompts (the
    data file edited under the same config), against a reward model retrained into the same
    directory, or from a checkpoint that recorded none of these, is refused with one line."""
    chain_dir, _ = rlhf_chain
    data = tmp_path / "prompts.jsonl"
    reward_model = tmp_path / "rm"
    shutil.copytree(chain_dir / "rm", reward_model)  # this test changes its weights

    def write_rows(first_question: str) -> None:
        questions = [first_question] + [f"What is {i} plus {i}?" for i in range(1, 16)]
        data.write_text("".join(json.dumps({"instruction": q, "input": "", "output": "4"}) + "\n" for q in questions))

    write_rows("What is 0 plus 0?")
    overrides = (
        "stage=ppo",
        f"model.init_from={chain_dir / 'sft'}",
        f"ppo.reward_model={reward_model}",
        "dataset=builtin_sft",
        f"dataset.path={data}",
        "dataset.test_size=0.25",
        "ppo.total_updates=2",
        "ppo.save_steps=1",
        "ppo.batch_size=4",
        "ppo.mini_batch_size=4",
        "ppo.ppo_epochs=1",
        "ppo.max_new_tokens=4",
        "ppo.eval_prompts=4",
    )
    run_dir = tmp_path / "ppo"
    with monkeypatch.context() as patch:
        crash_ppo_in_update(patch, 2)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(run_dir, *overrides)
    mark_file = run_dir / "checkpoints" / "checkpoint-1" / CHECKPOINT_MARK
    mark = json.loads(mark_file.read_text())
    assert set(mark["keep"]) == {"data", "start", "ppo.reward_model", "held_out_before", "held_out_lengths_before"}
    capsys.readouterr()

    write_rows("What is 0 times 0?")  # one row edited: the config is the same, the prompts are not
    with pytest.raises(SystemExit):
        train(run_dir, *overrides)
    assert (
        f"checkpoint-1 was written for other inputs than this run's: its training data (dataset.path={data}) differ"
        in capsys.readouterr().err
    )
    write_rows("What is 0 plus 0?")

    adapter = reward_model / "final" / "adapter_model.safetensors"
    weights = load_file(adapter)
    saved = adapter.read_bytes()
    save_file({name: tensor + 0.01 for name, tensor in weights.items()}, adapter)  # the reward model retrained in place
    with pytest.raises(SystemExit):
        train(run_dir, *overrides)
    assert f"its reward model's weights, precision or max_length (ppo.reward_model={reward_model}) differ" in capsys.readouterr().err
    adapter.write_bytes(saved)

    mark_file.write_text(json.dumps({**mark, "keep": {"held_out_before": mark["keep"]["held_out_before"]}}))  # an older checkpoint
    with pytest.raises(SystemExit):
        train(run_dir, *overrides)
    assert "it recorded no training data" in capsys.readouterr().err

    mark_file.write_text(json.dumps(mark))  # the same inputs: it resumes
    assert train(run_dir, *overrides)["eval_scores_before"] == pytest.approx(sum(mark["keep"]["held_out_before"]) / 4)


@pytest.mark.slow
def test_chain_refuses_to_resume_a_step_of_another_config(tmp_path, monkeypatch, capsys):
    """An interrupted chain step resumes only under the config it ran with; resume=overwrite
    starts it over (stale history and checkpoints gone)."""
    chain = (
        "experiment=rlhf_chain",
        "sft.max_steps=2",
        "rm.max_steps=2",
        "ppo.total_updates=3",
        "ppo.save_steps=1",
        "ppo.batch_size=8",
        "ppo.mini_batch_size=8",
        "ppo.ppo_epochs=1",
    )
    with monkeypatch.context() as patch:
        crash_ppo_in_update(patch, 3)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(tmp_path, *chain)
    assert history(tmp_path / "ppo", "step") == [1, 2]

    with pytest.raises(SystemExit) as stop:
        train(tmp_path, *chain, "ppo.kl_coef=0.5")
    assert stop.value.code == 2
    assert "ppo holds an interrupted run of a different config" in capsys.readouterr().err

    metrics = train(tmp_path, *chain, "ppo.kl_coef=0.5", "resume=overwrite")
    assert history(tmp_path / "ppo", "step") == [1, 2, 3]
    assert metrics["ppo/objective/kl_coef"] == pytest.approx(0.5, rel=0.05)  # started at the new 0.5


@pytest.mark.slow
def test_dpo_chain_reference_is_the_sft_policy(tmp_path, monkeypatch):
    """In DPO started from SFT, the adapter-disabled model (TRL's reference under LoRA) computes
    exactly the SFT policy's logits, not the base model's."""
    import trl
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf.tiny_model import ensure_tiny_model

    trained = {}
    original = trl.DPOTrainer.__init__

    def keep_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        trained["model"], trained["ref_model"] = self.model, self.ref_model

    monkeypatch.setattr(trl.DPOTrainer, "__init__", keep_model)
    train(tmp_path, "experiment=dpo_chain", "sft.max_steps=30", "dpo.max_steps=10")
    assert (tmp_path / "sft" / "metrics.json").is_file() and (tmp_path / "dpo" / "metrics.json").is_file()
    assert trained["ref_model"] is None  # no second copy: the reference is the disabled adapter

    inputs = torch.tensor([[5, 17, 42, 99, 7]])
    base = AutoModelForCausalLM.from_pretrained(ensure_tiny_model())
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ensure_tiny_model()), tmp_path / "sft" / "final")
    dpo = trained["model"].eval()
    with torch.no_grad(), dpo.disable_adapter():
        reference_logits = dpo(inputs).logits
    with torch.no_grad():
        assert torch.allclose(reference_logits, sft.eval()(inputs).logits, atol=1e-5)
        assert not torch.allclose(reference_logits, base(inputs).logits, atol=1e-3)
        assert not torch.allclose(dpo(inputs).logits, reference_logits, atol=1e-3)  # DPO moved away from it


@pytest.mark.slow
def test_reward_model_alone_reaches_high_accuracy(tmp_path):
    metrics = train(tmp_path, "stage=rm", "rm.max_steps=60")
    assert metrics["eval_accuracy"] >= 0.9 and metrics["eval_margin"] > 0
    adapter = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]  # the head is saved


def test_stage_inputs_from_other_runs_are_checked(tmp_path):
    from rlhf.command import run_stage

    with pytest.raises(UserError, match="ppo.reward_model"):
        run_stage(compose_config("stage=ppo"), tmp_path / "a")
    with pytest.raises(UserError, match="not a run directory"):
        run_stage(compose_config("stage=dpo", f"model.init_from={tmp_path / 'nowhere'}"), tmp_path / "b")
    unfinished = tmp_path / "unfinished"
    (unfinished / ".hydra").mkdir(parents=True)
    (unfinished / ".hydra" / "config.yaml").write_text("stage: sft\n")
    with pytest.raises(UserError, match="did not finish"):
        run_stage(compose_config("stage=dpo", f"model.init_from={unfinished}"), tmp_path / "c")


def test_eval_stage_judges_the_ppo_policy_against_its_reference(rlhf_chain, tmp_path):
    run_dir, _ = rlhf_chain
    metrics = train(tmp_path, "stage=eval", f"eval.policy={run_dir / 'ppo'}", f"eval.reward_model={run_dir / 'rm'}", "eval.num_prompts=24")
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == metrics["eval_prompts"] == 24
    assert {"prompt", "policy", "reference", "score_policy", "score_reference", "kl"} <= set(samples[0])
    assert metrics["eval_score_policy"] > metrics["eval_score_reference"]  # PPO's answers please the reward model more
    assert metrics["eval_win_rate"] > 0.5
    assert metrics["eval_kl"] == pytest.approx(sum(s["kl"] for s in samples) / 24)
    # PPO trained at temperature 1.0, eval samples at 0.7: eval_kl is the KL at 1.0, the judged answers' KL the second key
    assert metrics["eval_kl_temperature"] == 1.0
    assert metrics["eval_kl_at_sampling_temperature"] == pytest.approx(sum(s["kl_at_sampling_temperature"] for s in samples) / 24)


@pytest.mark.slow
def test_evaluations_from_one_start_share_the_reference_answers_they_would_sample(rlhf_chain, tmp_path):
    """PPO and DPO both start from the SFT run: the second evaluation reads the reference's answers
    and scores the first one cached, and they are the ones it samples itself with the cache off."""
    run_dir, _ = rlhf_chain
    train(tmp_path / "dpo", "stage=dpo", f"model.init_from={run_dir / 'sft'}", "dpo.max_steps=2")
    judged = ("stage=eval", f"eval.reward_model={run_dir / 'rm'}", "eval.num_prompts=12", "eval.batch_size=5")

    def evaluate(name, policy, *overrides):
        metrics = train(tmp_path / name, *judged, f"eval.policy={policy}", *overrides)
        return metrics, [json.loads(line) for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]

    evaluate("ppo", run_dir / "ppo")
    cached, cached_rows = evaluate("dpo-cached", tmp_path / "dpo")
    fresh, fresh_rows = evaluate("dpo-fresh", tmp_path / "dpo", "eval.ref_cache=false")
    assert cached["eval_reference_from_cache"] == 1 and fresh["eval_reference_from_cache"] == 0
    assert cached_rows == fresh_rows  # answers, scores, KL and lengths alike
    assert cached["data/reward_cut_inputs"] == fresh["data/reward_cut_inputs"]
    other, _ = evaluate("dpo-hotter", tmp_path / "dpo", "eval.temperature=0.9")  # other settings draw other answers
    assert other["eval_reference_from_cache"] == 0
    for entry in (cache_dir() / EVAL_REFERENCES).glob("*.json"):
        entry.write_text('{"texts": ["a file cut off mid-wri')
    damaged, damaged_rows = evaluate("dpo-damaged", tmp_path / "dpo")  # sampled again, not a crash
    assert damaged["eval_reference_from_cache"] == 0 and damaged_rows == fresh_rows


def half_of_the_prompts_longer(split: str) -> tuple:
    """(the tiny model's tokenizer, a max_prompt_length that half the default PPO dataset's
    `split` prompts exceed once chat-templated, those prompts as the dataset holds them)."""
    from rlhf.data import load_splits
    from rlhf.generation import prompt_ids
    from rlhf.lineage import Lineage

    cfg = compose_config("stage=ppo")
    tokenizer = Lineage.of(cfg.model).tokenizer()
    prompts = [row["prompt"] for row in getattr(load_splits(cfg.dataset, kind="prompt"), split)]
    lengths = sorted(len(prompt_ids(tokenizer, prompt)) for prompt in prompts)
    return tokenizer, lengths[len(lengths) // 2], prompts


def recording_prompts_and_samples(monkeypatch, module) -> tuple:
    """Lists that fill, call by call, with the prompts the reward models score and with
    (prompts, Samples) of each call of `module.sample` (the sampler the stage imported)."""
    from rlhf.reward_model import RewardModel

    scored, sampled = [], []
    sample, scores = module.sample, RewardModel.scores

    def recording_sample(model, tokenizer, prompts, *args, **kwargs):
        samples = sample(model, tokenizer, prompts, *args, **kwargs)
        sampled.append((prompts, samples))
        return samples

    def recording_scores(self, prompts, *args, **kwargs):
        scored.append(list(prompts))
        return scores(self, prompts, *args, **kwargs)

    monkeypatch.setattr(module, "sample", recording_sample)
    monkeypatch.setattr(RewardModel, "scores", recording_scores)
    return scored, sampled


def assert_sampled_from_whole(sampled: list, tokenizer) -> None:
    """Each sampled row's prompt tokens are the whole chat-templated prompt it was given: nothing
    cut mid-message after the prompt was chosen."""
    from rlhf.generation import prompt_ids

    for prompts, samples in sampled:
        width = samples.prompt_length
        for messages, ids, attended in zip(prompts, samples.sequences[:, :width], samples.attention_mask[:, :width]):
            assert ids[attended.bool()].tolist() == prompt_ids(tokenizer, messages)


def test_ppo_samples_from_the_prompts_its_reward_model_scores(rlhf_chain, tmp_path, monkeypatch):
    """A prompt over ppo.max_prompt_length loses its oldest turns (a last turn its start) before
    sampling. Cut by encode_prompts (as it was), it lost its first tokens mid-message while the reward
    model scored it whole: the policy was rewarded for an answer to another prompt."""
    import rlhf.ppo.trainer

    run_dir, _ = rlhf_chain
    tokenizer, limit, originals = half_of_the_prompts_longer("train")
    scored, sampled = recording_prompts_and_samples(monkeypatch, rlhf.ppo.trainer)
    sft, rm = f"model.init_from={run_dir / 'sft'}", f"ppo.reward_model={run_dir / 'rm'}"
    metrics = train(tmp_path, "stage=ppo", sft, rm, "ppo.total_updates=2", "ppo.eval_prompts=0", f"ppo.max_prompt_length={limit}")
    assert metrics["data/cut_prompts"] > 0
    assert len(sampled) == len(scored) == 2  # one rollout per update, scored once
    assert [prompts for prompts, _ in sampled] == scored  # the reward model scores the prompts sampled from ...
    assert_sampled_from_whole(sampled, tokenizer)  # ... whole
    assert any(prompt not in originals for prompts, _ in sampled for prompt in prompts)  # and some were cut


def test_eval_samples_from_the_prompts_its_judges_score(rlhf_chain, tmp_path, monkeypatch):
    import rlhf.stages.eval

    run_dir, _ = rlhf_chain
    tokenizer, limit, originals = half_of_the_prompts_longer("eval")
    scored, sampled = recording_prompts_and_samples(monkeypatch, rlhf.stages.eval)
    judged = (f"eval.policy={run_dir / 'ppo'}", f"eval.reward_model={run_dir / 'rm'}", "eval.ref_cache=false")
    metrics = train(tmp_path, "stage=eval", *judged, "eval.num_prompts=8", "eval.batch_size=8", f"eval.max_prompt_length={limit}")
    assert metrics["data/cut_prompts"] > 0
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    # the reference's answers, then the policy's (judged, at eval's 0.7), then the policy's at its training temperature (eval_kl)
    assert len(sampled) == 3
    assert all(prompts == [row["prompt"] for row in samples] for prompts, _ in sampled)
    assert_sampled_from_whole(sampled, tokenizer)
    assert any(row["prompt"] not in originals for row in samples)  # some were cut
    assert len(scored) == 2 and all(prompts == [row["prompt"] for row in samples] for prompts in scored)  # one batch of 8 each


def test_sampling_refuses_a_prompt_longer_than_its_limit():
    """The one place that used to cut a prompt mid-message (encode_prompts) refuses instead: a
    caller that forgot to fit its prompts fails, rather than sampling from a prompt it scores whole."""
    from rlhf.generation import encode_prompts, prompt_ids

    tokenizer, _, prompts = half_of_the_prompts_longer("train")
    longest = max(prompts, key=lambda prompt: len(prompt_ids(tokenizer, prompt)))
    length = len(prompt_ids(tokenizer, longest))
    assert encode_prompts(tokenizer, [longest], length, torch.device("cpu"))["input_ids"].shape[1] == length
    with pytest.raises(ValueError, match=f"a prompt of {length} templated tokens exceeds max_prompt_length={length - 1}"):
        encode_prompts(tokenizer, [longest], length - 1, torch.device("cpu"))


@pytest.mark.slow
def test_the_adaptive_kl_controller_holds_a_target_below_the_unconstrained_kl(rlhf_chain, tmp_path):
    """PPO from kl_coef 0.02 runs its KL up to about 12 nats; with ppo.target=3 and a horizon of one
    batch the controller raises kl_coef and the KL of the last 10 updates ends within 25% of 3.
    (Without its anti-windup it cut kl_coef 10x while the policy had not moved yet, and the KL
    ended 60% over.)"""
    chain_dir, _ = rlhf_chain
    common = ("stage=ppo", f"model.init_from={chain_dir / 'sft'}", f"ppo.reward_model={chain_dir / 'rm'}", "ppo.kl_coef=0.02")
    common += ("ppo.eval_prompts=0",)

    def recent_kl(run_dir) -> float:  # the KL the run ends at: its last 10 updates, as history.jsonl reports them
        kls = [json.loads(line)["objective/kl"] for line in (run_dir / "history.jsonl").read_text().splitlines()]
        return sum(kls[-10:]) / 10

    train(tmp_path / "free", *common, "ppo.adaptive_kl=false")
    held = train(tmp_path / "held", *common, "ppo.target=3", "ppo.horizon=32")
    assert recent_kl(tmp_path / "free") > 2 * 3  # the target is well below where the KL goes unconstrained
    assert recent_kl(tmp_path / "held") == pytest.approx(3, rel=0.25)
    assert held["objective/kl_coef_final"] > 2 * 0.02  # raised to hold it


def test_a_ppo_run_opens_its_reward_model_run_and_decides_its_device_once(rlhf_chain, tmp_path, monkeypatch):
    """The run context (rlhf.context) opens and checks every earlier run the config names once, and
    decides the device once: reuse's identity, the checkpoint's input identity and the reward
    model's loading all read it (before it, a PPO run opened its reward-model run 3 times)."""
    from rlhf import context
    from rlhf.lineage import TrainedRun

    chain_dir, _ = rlhf_chain
    opened, devices = [], []
    open_run, device_for = TrainedRun.of.__func__, context.device_for

    def counted(cls, run_dir, *args):
        opened.append(Path(run_dir).resolve())
        return open_run(cls, run_dir, *args)

    monkeypatch.setattr(TrainedRun, "of", classmethod(counted))
    monkeypatch.setattr(context, "device_for", lambda cfg: devices.append(1) or device_for(cfg))
    rm, sft = chain_dir / "rm", chain_dir / "sft"
    train(tmp_path / "ppo", "reuse=true", "stage=ppo", f"model.init_from={sft}", f"ppo.reward_model={rm}", *ONE_SMALL_PPO_UPDATE)
    assert opened.count(rm.resolve()) == 1
    assert len(devices) == 1
