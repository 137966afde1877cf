"""The benchmark command of the README runs end to end and writes its JSON and table (a short
run: the numbers of a real measurement need more steps than a test can afford)."""

import json
import subprocess
import sys

from conftest import ROOT


def test_benchmark_writes_its_json_and_markdown_table(tmp_path):
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--steps", "2", "--ppo-updates", "1", "--repeats", "1", "--sweep-pairs", "128", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [json_file] = tmp_path.glob("*-tiny.json")
    result = json.loads(json_file.read_text())
    for stage in ("sft", "dpo"):
        overhead = result[f"overhead_{stage}"]
        # Loose bounds: 2-step training phases are too short to measure closely (the README's
        # figures use 150 steps); these catch gross regressions, e.g. a second process start-up.
        assert overhead["training_ratio"] < 4 and overhead["process_ratio"] < 1.5
    assert result["startup_cfg_job_seconds"] < 3
    assert result["peak_rss_ratio_dpo_over_sft"] < 1.3
    assert result["overhead_dpo"]["reference_logps_seconds_framework"] > 0
    sweep = result["ref_cache_sweep"]
    assert len(sweep["job_seconds"]) == 3
    first, *later = sweep["reference_logps_seconds"]
    assert max(later) < 0.5 * first, "later sweep jobs should load the reference log-probs, not compute them"
    assert result["ppo"]["time/generated_tokens_per_second"] > 0
    assert {"time/generation_per_update", "time/optimisation_per_update"} <= set(result["ppo"])
    table = json_file.with_suffix(".md").read_text()
    for measure in ("SFT training-phase time", "DPO whole process", "`train.py --cfg job` start-up", "peak RSS, DPO+LoRA",
                    "beta sweep", "... of which reference log-probs", "PPO time/generation_per_update"):
        assert f"| {measure}" in table, measure
