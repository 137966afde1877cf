"""Figures of runs, drawn with matplotlib (a dependency of the project): the training curves of
compared runs (compare.png and report.html's panels) and the aligner comparison's reward-KL
frontier. Where matplotlib is missing all the same (an install without dependencies) every
function here returns None or False, and the caller writes everything else.

Runs are `rlhf.compare.Run`s: a name, command-line overrides and history.jsonl's lines.
"""

import io
import sys
from pathlib import Path

from rlhf.errors import UserError
from rlhf.metrics import is_number

# report.html's curves, each from the first of these history keys a run logged.
PANELS = {
    "loss": ("loss",),
    "reward": ("reward", "objective/scores", "rewards/margins", "eval_margin"),
    "KL": ("kl", "objective/kl", "kl_loss"),
    "win rate": ("eval_win_rate", "eval_rewards/accuracies", "eval_accuracy"),
}


def new_figure(width: float, height: float):
    """An empty matplotlib figure ready to save, or None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: Path, dpi: int = 100) -> None:
    try:
        fig.savefig(path, dpi=dpi)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None


def report_curves_png(runs) -> bytes | None:
    """One panel per entry of PANELS that any run logged, every run a line in it, as PNG bytes;
    None without matplotlib or without any such curve."""
    present = {title: keys for title, keys in PANELS.items() if any(first_curve(run, keys) for run in runs)}
    fig = new_figure(16, 4.2) if present else None
    if fig is None:
        return None
    labels = legend_labels(runs)
    for ax, (title, keys) in zip(fig.subplots(1, len(present), squeeze=False)[0], present.items()):
        draw_panel(ax, runs, keys, labels, title)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(4, max(1, len(runs))), fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def plot_curves(runs, metric: str, path: Path, explicit: bool = False) -> bool:
    """compare.png: training loss (left) and `metric` (right) over step, one line per run;
    False when skipped (no matplotlib)."""
    key = history_key(runs, metric)
    fig = new_figure(12 if key else 7, 4.8)
    if fig is None:
        note(f"matplotlib is not installed: skipped {path.name} (pip install -e . installs it)")
        return False
    if key is None and explicit:
        note(f"no run logged {metric!r} in history.jsonl: {path.name} shows the training loss only")
    panels = fig.subplots(1, 2 if key else 1, squeeze=False)[0]
    labels = legend_labels(runs)
    draw_panel(panels[0], runs, ("loss",), labels, title="training loss")
    if key:
        draw_panel(panels[1], runs, (key,), labels, title=key)
    common = common_overrides(runs)
    if common:
        fig.suptitle(" ".join(common))
    fig.legend(*panels[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(3, max(1, len(runs))), fontsize="small")
    save(fig, path)
    return True


def draw_panel(ax, runs, keys: tuple, labels: list, title: str) -> None:
    """Each run's curve of the first of `keys` it logged, one colour per run."""
    for index, (run, label) in enumerate(zip(runs, labels)):
        # every run gets a legend entry (from the left panel), even one with nothing to draw
        steps, values = first_curve(run, keys) or ([], [])
        sparse = len(steps) <= 10  # evaluations: a few points, show them
        ax.plot(steps, values, label=label, color=f"C{index % 10}", marker="o" if sparse else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("step")
    if len(keys) == 1:
        ax.set_ylabel(keys[0])
    ax.grid(alpha=0.3)


def history_key(runs, metric: str) -> str | None:
    """`metric` as history.jsonl names it: itself, or with/without the eval_ prefix."""
    alternative = metric.removeprefix("eval_") if metric.startswith("eval_") else "eval_" + metric
    for key in (metric, alternative):
        if any(curve(run, key) for run in runs):
            return key
    return None


def first_curve(run, keys) -> tuple:
    return next((points for points in (curve(run, key) for key in keys) if points), ())


def curve(run, key: str) -> tuple:
    """(steps, values) of `key` over the run's log lines, the end-of-training summary excluded."""
    points = [
        (line["step"], line[key])
        for line in run.history
        if "train_runtime" not in line and is_number(line.get("step")) and is_number(line.get(key))
    ]
    return tuple(zip(*points))


def legend_labels(runs) -> list:
    """Each run's name and the overrides that set it apart (those all runs share go in the title)."""
    common = set(common_overrides(runs))
    labels = []
    for run in runs:
        own = " ".join(item for item in run.overrides if item not in common)
        labels.append(f"{run.name}: {own}" if own else run.name)
    return labels


def common_overrides(runs) -> list:
    if len(runs) < 2:
        return []
    return [item for item in runs[0].overrides if all(item in run.overrides for run in runs[1:])]


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)
