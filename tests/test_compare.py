"""`python -m rlhf.compare` on synthetic run directories (no training): table order, overrides,
statuses, compare.csv, compare.png, and one-line errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf.compare import main

ROOT = Path(__file__).resolve().parents[1]


def make_run(run_dir: Path, overrides: list, metrics: dict | None = None, history: list = (), status: dict | None = None):
    """A run directory as train.py leaves it (only the files rlhf.compare reads)."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if history:
        (run_dir / "history.jsonl").write_text("".join(json.dumps(line) + "\n" for line in history))
    if status is not None:
        (run_dir / "status.json").write_text(json.dumps(status))
    return run_dir


def dpo_history(scale: float) -> list:
    """Training lines, evaluation lines and the end-of-training summary, like the trainer logs."""
    lines = []
    for step in (5, 10, 15, 20):
        lines.append({"step": step, "epoch": step / 30, "loss": scale / step, "rewards/margins": step * scale})
        if step % 10 == 0:
            lines.append({"step": step, "epoch": step / 30, "eval_loss": scale / step, "eval_rewards/margins": step * scale})
    lines.append({"step": 20, "epoch": 0.7, "train_runtime": 8.4, "train_loss": scale / 10})
    return lines


def dpo_metrics(eval_loss: float, margins: float) -> dict:
    return {
        "train_runtime": 8.4,
        "train_samples_per_second": 150.0,
        "train_loss": eval_loss * 2,
        "epoch": 2.0,
        "eval_loss": eval_loss,
        "eval_runtime": 0.2,
        "eval_rewards/accuracies": 1.0,
        "eval_rewards/margins": margins,
    }


@pytest.fixture
def runs(tmp_path):
    """A two-job sweep (job 1 has the lower eval_loss) and, elsewhere, one failed run."""
    sweep = tmp_path / "sweep"
    make_run(sweep / "0", ["stage=dpo", "dpo.beta=0.1", "hydra.sweep.dir=/x"], dpo_metrics(0.5, 2.0), dpo_history(1.0))
    make_run(sweep / "1", ["stage=dpo", "dpo.beta=0.3", "hydra.sweep.dir=/x"], dpo_metrics(0.1, 7.0), dpo_history(0.5))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    failed = make_run(
        tmp_path / "failed", ["stage=dpo", "dpo.beta=9"], None, dpo_history(2.0)[:2], {"status": "failed", "error": "CUDA out of memory"}
    )
    return sweep, failed


def table_rows(stdout: str) -> list:
    """The table's data rows (after the dashed rule, up to the first blank line), split on spaces."""
    lines = stdout.splitlines()
    body = lines[2 : lines.index("")] if "" in lines else lines[2:]
    return [line.split() for line in body]


def read_csv(path: Path) -> list:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def test_sweep_and_failed_run_sorted_by_eval_loss(runs, capsys):
    sweep, failed = runs
    assert main([str(sweep), str(failed)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:3] == ["run", "status", "overrides"]
    assert "eval_loss" in header and "train_loss" in header
    assert not any("runtime" in name or "per_second" in name for name in header)  # throughput noise hidden
    rows = table_rows(out)
    # default sort: eval_loss ascending (job 1 first); the failed run has no metrics: last
    assert [row[0] for row in rows] == ["1", "0", failed.as_posix()]
    assert rows[0][1:5] == ["done", "stage=dpo", "dpo.beta=0.3", "0.2"]  # train_loss of job 1
    assert rows[2][1] == "failed" and "dpo.beta=9" in rows[2]
    assert "hydra.sweep.dir" not in out
    assert f"{failed.as_posix()}: failed: CUDA out of memory" in out


def test_sort_by_margins_is_descending_and_ascending_forces(runs, capsys):
    sweep, _ = runs
    assert main([str(sweep), "--sort", "eval_rewards/margins", "--columns", "eval_rewards/margins,eval_loss"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["run", "status", "overrides", "eval_rewards/margins", "eval_loss"]
    assert [row[0] for row in table_rows(out)] == ["1", "0"]  # higher margin first
    assert main([str(sweep), "--sort", "eval_rewards/margins", "--ascending"]) == 0
    assert [row[0] for row in table_rows(capsys.readouterr().out)] == ["0", "1"]
    assert main([str(sweep), "--sort", "eval_loss", "--descending"]) == 0
    assert [row[0] for row in table_rows(capsys.readouterr().out)] == ["0", "1"]


def test_csv_and_png_written_into_the_first_directory(runs, capsys):
    sweep, failed = runs
    assert main([str(sweep), str(failed), "--metric", "rewards/margins"]) == 0
    rows = read_csv(sweep / "compare.csv")
    assert rows[0] == ["run", "status", "overrides", *dpo_metrics(0, 0)]  # every metric, runtime included
    by_run = {row[0]: dict(zip(rows[0], row)) for row in rows[1:]}
    assert [row[0] for row in rows[1:]] == ["1", "0", failed.as_posix()]
    assert by_run["1"]["overrides"] == "stage=dpo dpo.beta=0.3"
    assert float(by_run["1"]["eval_loss"]) == 0.1 and float(by_run["0"]["eval_rewards/margins"]) == 2.0
    assert by_run[failed.as_posix()]["status"] == "failed" and by_run[failed.as_posix()]["eval_loss"] == ""
    assert (sweep / "compare.png").read_bytes().startswith(b"\x89PNG")
    assert not (failed / "compare.csv").exists()


def test_without_matplotlib_csv_and_table_still_come(runs, capsys, monkeypatch):
    sweep, _ = runs
    for name in [name for name in sys.modules if name.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import matplotlib...` fail
    assert main([str(sweep)]) == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed" in captured.err
    assert (sweep / "compare.csv").exists() and not (sweep / "compare.png").exists()
    assert [row[0] for row in table_rows(captured.out)] == ["1", "0"]


def test_unknown_sort_metric_is_one_line_error(runs, capsys):
    sweep, _ = runs
    assert main([str(sweep), "--sort", "eval_nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run has the metric 'eval_nope'") and err.count("\n") == 1


def test_command_line_and_bad_path(runs, tmp_path):
    sweep, failed = runs
    command = [sys.executable, "-m", "rlhf.compare", str(sweep), str(failed), "--sort", "eval_rewards/margins"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [row[0] for row in table_rows(done.stdout)] == ["1", "0", failed.as_posix()]
    assert (sweep / "compare.png").read_bytes().startswith(b"\x89PNG")

    empty = tmp_path / "empty"
    empty.mkdir()
    for bad in (empty, tmp_path / "missing"):
        done = subprocess.run([sys.executable, "-m", "rlhf.compare", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert done.stderr == f"error: {bad}: not a run directory or a sweep directory\n"
        assert "Traceback" not in done.stderr and done.stdout == ""


def test_does_not_import_torch():
    code = "import sys, rlhf.compare; print('torch' in sys.modules or 'transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_report_html_is_one_self_contained_file(runs, capsys):
    """report.html holds the table of runs and the curves as embedded images, and references
    no http(s) resource: it opens anywhere without network access."""
    sweep, _ = runs
    assert main([str(sweep)]) == 0
    page = (sweep / "report.html").read_text(encoding="utf-8")
    assert '<table class="sortable">' in page and page.count("<tr>") == 3  # header + two runs
    assert "dpo.beta=0.1" in page and "dpo.beta=0.3" in page
    assert page.count("data:image/png;base64,") >= 1  # the curves, embedded
    assert "http://" not in page and "https://" not in page
    assert "<script>" in page and "sorted-asc" in page  # clicking a header sorts


def make_aligner_comparison(run_dir: Path, betas: dict) -> Path:
    """What experiment=compare_aligners leaves (the files the comparison reads): an SFT step,
    policy steps, and one stage=eval step per policy with proxy and judge scores."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("stage: chain\n")
    make_run(run_dir / "sft", ["stage=sft"], {"train_loss": 1.0})
    for index, (stage, beta) in enumerate(betas.items()):
        policy = make_run(run_dir / stage, [f"stage={stage}"], {"stage_runtime": 10.0 + index})
        key = {"dpo": "beta", "ppo": "kl_coef", "grpo": "beta", "rloo": "beta"}[stage]
        (policy / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"stage": stage, stage: {key: beta}}))
        evaluated = make_run(
            run_dir / f"eval_{stage}",
            ["stage=eval"],
            {
                "eval_win_rate": 0.6 + index / 20,
                "eval_score_policy": 1.0 + index,
                "eval_score_reference": 0.5,
                "eval_judge_win_rate": 0.55,
                "eval_score_judge_policy": 0.8 - index / 10,
                "eval_score_judge_reference": 0.4,
                "eval_kl": 2.0 * (index + 1),
                "eval_length_policy": 12.0,
            },
        )
        (evaluated / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"stage": "eval", "eval": {"policy": str(policy)}}))
    return run_dir


def test_an_aligner_comparison_gets_its_table_frontier_and_report(tmp_path, capsys):
    run_dir = make_aligner_comparison(tmp_path / "D", {"dpo": 0.1, "ppo": 0.05, "grpo": 0.04, "rloo": 0.05})
    assert main([str(run_dir)]) == 0
    rows = {row["stage"]: row for row in csv.DictReader((run_dir / "compare_aligners.csv").open())}
    assert set(rows) == {"dpo", "ppo", "grpo", "rloo"}
    assert rows["dpo"]["setting"] == "dpo.beta=0.1" and rows["ppo"]["setting"] == "ppo.kl_coef=0.05"
    assert float(rows["ppo"]["kl"]) == 4.0 and float(rows["ppo"]["judge_win_rate"]) == 0.55
    assert float(rows["rloo"]["wall_seconds"]) == 13.0 and float(rows["dpo"]["proxy_score_sft"]) == 0.5
    for column in ("proxy_win_rate", "proxy_score", "judge_win_rate", "judge_score", "kl", "length"):
        assert column in rows["grpo"]
    assert (run_dir / "frontier.png").stat().st_size > 1000
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "reward-KL frontier" in page and page.count("data:image/png;base64,") == 1  # the frontier (no curves logged here)
    assert "judge win" in capsys.readouterr().out  # the aligner table on stdout


def test_runs_that_differ_only_in_seed_are_grouped_with_intervals_and_a_noise_verdict(tmp_path, capsys):
    """A 2-seed x 2-beta sweep (overrides as Hydra writes them): two groups, each with its mean
    over the seeds and the 95% t interval of that mean (1 degree of freedom: t = 12.7062 from
    published tables), and the best against the next with the Welch interval of the difference.
    A third seed of a tight pair and a far group: 'beyond noise'."""
    sweep = tmp_path / "sweep"
    values = {("0.1", "1"): 0.70, ("0.1", "2"): 0.60, ("0.3", "1"): 0.58, ("0.3", "2"): 0.56}
    for job, ((beta, seed), win_rate) in enumerate(values.items()):
        make_run(sweep / str(job), [f"dpo.beta={beta}", f"seed={seed}"], {"eval_win_rate": win_rate}, status={"status": "done"})
    assert main([str(sweep), "--sort", "eval_win_rate"]) == 0
    out = capsys.readouterr().out
    # beta 0.1: mean 0.65, sd of the mean 0.05; beta 0.3: mean 0.57, sd of the mean 0.01
    assert "dpo.beta=0.1: 2 seeds, 0.65 [0.01469, 1.285]" in out  # 0.65 -+ 12.7062 x 0.05
    assert "dpo.beta=0.3: 2 seeds, 0.57 [0.4429, 0.6971]" in out  # 0.57 -+ 12.7062 x 0.01
    assert "- dpo.beta=0.3: +0.08 [" in out and "within noise" in out
    rows = list(csv.DictReader((sweep / "compare_seeds.csv").open(newline="")))
    assert [row["group"] for row in rows] == ["dpo.beta=0.1", "dpo.beta=0.3"] and rows[0]["verdict"] == "within noise"
    assert "runs that differ only in their seed" in (sweep / "report.html").read_text(encoding="utf-8")

    tight = tmp_path / "tight"
    spread = {("0.1", "1"): 0.80, ("0.1", "2"): 0.81, ("0.1", "3"): 0.79, ("0.3", "1"): 0.50, ("0.3", "2"): 0.52, ("0.3", "3"): 0.51}
    for job, ((beta, seed), win_rate) in enumerate(spread.items()):
        make_run(tight / str(job), [f"dpo.beta={beta}", f"seed={seed}"], {"eval_win_rate": win_rate}, status={"status": "done"})
    assert main([str(tight), "--sort", "eval_win_rate"]) == 0
    # equal variances (sd 0.01 each, 3 seeds): Welch's df = 4, t = 2.7764; difference 0.29 -+ 2.7764 x sqrt(2 x 0.01^2 / 3)
    assert "- dpo.beta=0.3: +0.29 [0.2673, 0.3127], beyond noise" in capsys.readouterr().out


def eval_run(run_dir: Path, overrides: list, gains: list, lengths: tuple = (10, 10)) -> Path:
    """A stage=eval run whose prompts gained `gains` (policy score - reference score, the reference
    scoring 0): samples.jsonl as eval writes it, metrics.json with the mean."""
    make_run(run_dir, overrides, {"eval_score_gain": sum(gains) / len(gains)}, status={"status": "done"})
    rows = [
        {"score_policy": g, "score_reference": 0.0, "length_policy": lengths[1], "length_reference": lengths[0], "kl": 1.0} for g in gains
    ]
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run_dir


def test_seed_groups_of_evaluations_take_their_interval_over_seeds_and_prompts(tmp_path, capsys):
    """Evaluations leave one row per prompt: a group's interval is the bootstrap over seeds x
    prompts. By hand: when every prompt of a seed gained the same, only the seed draw varies - with
    2 seeds the pooled mean is v1 (1/4 of draws), (v1+v2)/2 (1/2) or v2 (1/4), so the 95% interval
    is exactly [v1, v2]; the t interval over the two seeds would be 12.7 times their half-spread."""
    sweep = tmp_path / "sweep"
    per_prompt = {("0.1", "1"): [0.2] * 30, ("0.1", "2"): [0.6] * 30, ("0.3", "1"): [0.0] * 30, ("0.3", "2"): [0.1] * 30}
    for job, ((beta, seed), gains) in enumerate(per_prompt.items()):
        eval_run(sweep / str(job), [f"dpo.beta={beta}", f"seed={seed}"], gains)
    assert main([str(sweep), "--sort", "eval_score_gain"]) == 0
    out = capsys.readouterr().out
    assert "dpo.beta=0.1: 2 seeds, 0.4 [0.2, 0.6] (bootstrap over seeds x prompts)" in out
    assert "dpo.beta=0.3: 2 seeds, 0.05 [0, 0.1] (bootstrap over seeds x prompts)" in out
    # the difference's draws: (0.2, 0.4 or 0.6) - (0, 0.05 or 0.1), all above 0
    assert "- dpo.beta=0.3: +0.35 [" in out and "beyond noise" in out
    rows = list(csv.DictReader((sweep / "compare_seeds.csv").open(newline="")))
    assert rows[0]["interval"] == "bootstrap over seeds x prompts" and float(rows[0]["diff_ci95_low"]) > 0

    # Seeds that agree on the same prompts, prompts that vary: the interval is the prompts' (about mean -+ 1.96 sd / sqrt(60)):
    # one draw of prompts serves both seeds, so 2 seeds of the same 60 prompts are not 120 independent prompts
    noisy = tmp_path / "noisy"
    gains = [(-1.0) ** i * (1 + i % 3) / 3 for i in range(60)]  # mean 0 +- a little, sd about 0.68
    for job, seed in enumerate(("1", "2")):
        eval_run(noisy / str(job), [f"seed={seed}"], gains)
    assert main([str(noisy), "--sort", "eval_score_gain"]) == 0
    [row] = list(csv.DictReader((noisy / "compare_seeds.csv").open(newline="")))
    mean = sum(gains) / len(gains)
    half = 1.96 * (sum((g - mean) ** 2 for g in gains) / (len(gains) - 1)) ** 0.5 / len(gains) ** 0.5
    assert float(row["ci95_low"]) == pytest.approx(mean - half, abs=0.25 * half)
    assert float(row["ci95_high"]) == pytest.approx(mean + half, abs=0.25 * half)

    # Rows without what the metric reads (no judge scored them): the t interval over the seeds, not a traceback
    assert main([str(noisy), "--sort", "eval_score_gain", "--columns", "eval_score_gain"]) == 0
    for job in ("0", "1"):
        metrics = json.loads((noisy / job / "metrics.json").read_text())
        (noisy / job / "metrics.json").write_text(json.dumps({**metrics, "eval_judge_score_gain": 0.1 + int(job) / 10}))
    assert main([str(noisy), "--sort", "eval_judge_score_gain"]) == 0
    [row] = list(csv.DictReader((noisy / "compare_seeds.csv").open(newline="")))
    assert row["interval"] == "t over seeds" and float(row["mean"]) == pytest.approx(0.15)
