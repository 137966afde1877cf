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
        assert overhead["training_ratio"] > 0 and overhead["process_ratio"] > 0
    assert 0 < result["startup_cfg_job_seconds"] < 30
    assert result["peak_rss_mib"]["dpo_lora"] > 100 and result["peak_rss_mib"]["sft_lora"] > 100
    sweep = result["ref_cache_sweep"]
    assert len(sweep["job_seconds"]) == 3
    first, *later = sweep["reference_logps_seconds"]
    assert max(later) < 0.5 * first, "later sweep jobs should load the reference log-probs, not compute them"
    assert result["ppo"]["time/generated_tokens_per_second"] > 0
    assert {"time/generation_per_update", "time/optimisation_per_update"} <= set(result["ppo"])
    table = json_file.with_suffix(".md").read_text()
    assert "| DPO training-phase time, framework / plain TRL |" in table
    assert table.count("\n|") >= 12  # a row per measure
