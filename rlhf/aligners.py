"""The comparison of aligners (`experiment=compare_aligners`): one row per evaluated policy, the
reward-KL frontier, and the table printed at the end of the run.

An aligner comparison is a chain whose `stage=eval` steps each judge one policy (DPO, PPO,
GRPO, RLOO, ...) against the SFT policy it started from, on the same held-out prompts, with the
proxy reward model (the one PPO, GRPO and RLOO optimised) and a judge reward model trained on a
disjoint part of the preference data (`eval.judge_model`). Scoring every policy with the proxy
alone rewards over-optimisation (Gao et al. 2022); the judge shows it.

Reads run directories only (their .hydra/config.yaml and metrics.json); imports neither torch
nor transformers.
"""

from pathlib import Path

from rlhf import plots, report
from rlhf.registry import STAGES
from rlhf.runs import read_json, read_yaml, relative_name

CSV_NAME = "compare_aligners.csv"
PNG_NAME = "frontier.png"
COLUMNS = (
    "run",
    "policy",
    "stage",
    "setting",
    "proxy_win_rate",
    "proxy_score",
    "proxy_gain",
    "proxy_gain_lc",
    "judge_win_rate",
    "judge_score",
    "judge_gain",
    "judge_gain_lc",
    "kl",
    "length",
    "length_change",
    "wall_seconds",
    "proxy_score_sft",
    "judge_score_sft",
)


def rows(eval_dirs: list, name_base: Path) -> list:
    """One row per finished `stage=eval` run among `eval_dirs` that names a judge model."""
    found = []
    for eval_dir in eval_dirs:
        config, metrics = read_yaml(eval_dir / ".hydra" / "config.yaml"), read_json(eval_dir / "metrics.json")
        if not config or config.get("stage") != "eval" or not metrics or "eval_judge_win_rate" not in metrics:
            continue
        policy_dir = Path(config["eval"]["policy"])
        policy_config, policy_metrics = read_yaml(policy_dir / ".hydra" / "config.yaml") or {}, read_json(policy_dir / "metrics.json") or {}
        stage = policy_config.get("stage", "?")
        strength = STAGES[stage].strength if stage in STAGES else None  # the setting of its distance from the reference
        value = (policy_config.get(stage) or {}).get(strength) if strength else None
        found.append(
            {
                "run": relative_name(eval_dir.parent, name_base),
                "policy": policy_dir.name,
                "stage": stage,
                "setting": f"{stage}.{strength}={value}" if value is not None else "",
                "proxy_win_rate": metrics["eval_win_rate"],
                "proxy_score": metrics["eval_score_policy"],
                "proxy_gain": metrics.get("eval_score_gain"),
                "proxy_gain_lc": metrics.get("eval_score_gain_lc"),  # at equal answer length; absent in older evaluations
                "judge_win_rate": metrics["eval_judge_win_rate"],
                "judge_score": metrics["eval_score_judge_policy"],
                "judge_gain": metrics.get("eval_judge_score_gain"),
                "judge_gain_lc": metrics.get("eval_judge_score_gain_lc"),
                "kl": metrics["eval_kl"],
                "length": metrics["eval_length_policy"],
                "length_change": metrics.get("eval_length_change"),
                "wall_seconds": policy_metrics.get("stage_runtime"),
                "proxy_score_sft": metrics["eval_score_reference"],
                "judge_score_sft": metrics["eval_score_judge_reference"],
            }
        )
    return found


def write_csv(table: list, path: Path) -> None:
    report.write_csv(path, COLUMNS, table)


def format_table(table: list) -> str:
    """The rows as aligned text: the policy, its setting, proxy and judge win rate and score gain
    over the SFT policy (raw, and at equal answer length), KL, length and its change, time."""
    header = ("policy", "setting", "proxy win", "proxy gain", "@len", "judge win", "judge gain", "@len", "KL", "length", "+len", "time (s)")

    def number(value, digits: int = 3) -> str:
        return f"{value:.{digits}f}" if value is not None else "-"

    lines = [
        (
            f"{row['run']}/{row['policy']}" if row["run"] != "." else row["policy"],
            row["setting"],
            number(row["proxy_win_rate"]),
            number(row["proxy_gain"]),
            number(row["proxy_gain_lc"]),
            number(row["judge_win_rate"]),
            number(row["judge_gain"]),
            number(row["judge_gain_lc"]),
            number(row["kl"]),
            number(row["length"], 1),
            number(row["length_change"], 1),
            number(row["wall_seconds"], 0),
        )
        for row in table
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *lines])


def plot_frontier(table: list, path: Path) -> bool:
    """Judge score (filled) and proxy score (hollow) against KL to the SFT policy, one point per
    policy, the SFT policy itself at KL 0; False when matplotlib is missing."""
    fig = plots.new_figure(7.5, 5)
    if fig is None:
        return False
    ax = fig.subplots()
    stages = sorted({row["stage"] for row in table})
    for index, stage in enumerate(stages):
        mine = [row for row in table if row["stage"] == stage]
        color = f"C{index % 10}"
        ax.scatter([r["kl"] for r in mine], [r["judge_score"] for r in mine], color=color, label=f"{stage} (judge)")
        ax.scatter([r["kl"] for r in mine], [r["proxy_score"] for r in mine], facecolors="none", edgecolors=color, label=f"{stage} (proxy)")
        for row in mine:
            ax.annotate(
                row["setting"].split(".", 1)[-1] or row["policy"],
                (row["kl"], row["judge_score"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    if table:
        judge_sft = sum(r["judge_score_sft"] for r in table) / len(table)
        proxy_sft = sum(r["proxy_score_sft"] for r in table) / len(table)
        ax.scatter([0], [judge_sft], color="black", marker="s", label="SFT (judge)")
        ax.scatter([0], [proxy_sft], facecolors="none", edgecolors="black", marker="s", label="SFT (proxy)")
    ax.set_xlabel("KL(policy || SFT policy), nats per answer")
    ax.set_ylabel("mean reward-model score on held-out prompts")
    ax.set_title("reward-KL frontier: judge (filled) and proxy (hollow) reward models")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    plots.save(fig, path)
    return True
