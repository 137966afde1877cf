"""Compare finished runs side by side: a table on stdout, plus compare.csv, compare.png and a
self-contained report.html.

Usage:

    python -m rlhf.compare multirun/2025-01-01/12-00-00             # every job of a sweep
    python -m rlhf.compare outputs/a outputs/b multirun/x/3          # any mix of runs and sweeps
    python -m rlhf.compare SWEEP --sort eval_rewards/margins         # best margin first
    python -m rlhf.compare SWEEP --sort eval_loss --descending       # force the order
    python -m rlhf.compare SWEEP --columns eval_loss,eval_rewards/accuracies
    python -m rlhf.compare SWEEP --metric rewards/margins            # right panel of compare.png

What it reads (see docs/configuration.md, "What a run leaves"): a run directory is one that holds `.hydra/`,
`metrics.json` or `status.json`; any other directory given stands for its immediate
subdirectories that are runs (a sweep: S/0, S/1, ... in numeric order). From each run:
`.hydra/overrides.yaml` (Hydra's own `hydra.*` overrides hidden), `metrics.json` (final
metrics), `history.jsonl` (the curves) and `status.json` (its "status", when present; else
"done" when metrics.json exists, else "incomplete").

What it writes, into the FIRST directory given:
- stdout: one row per run - run (relative to the first argument, or to its parent when that is
  itself a run), status, overrides, then the chosen final metrics; errors of failed runs below.
- compare.csv: every final metric of every run, after the run, status and overrides columns.
- compare.png: one line per run - training `loss` over step on the left, `--metric` on the right.
  Needs matplotlib (a dependency): where it is missing a note says so and the rest is still written.
- report.html: one file that opens without network access: the sortable table of runs and their
  curves side by side (loss, reward, KL, win rate over steps); for an aligner comparison
  (`experiment=compare_aligners`, or a sweep of them) also compare_aligners.csv, the aligner
  table and frontier.png (judge and proxy score against KL), written beside it.
A chain run stands for its steps; a step reused from another run (a sweep's shared SFT and
reward model) is shown once.

Sorting: by `--sort` (default: eval_loss when any run has it, else train_loss). Metrics whose
name says lower is better (contains "loss", "runtime" or "perplexity") sort ascending, all
others descending; `--ascending` / `--descending` force it. Runs lacking the metric go last.

Columns: by default train_loss and the eval_* metrics, without throughput noise (runtime,
samples/steps per second, token counts) and raw DPO logits/logps, plus the sort metric;
`--columns a,b,c` chooses. compare.csv always has every metric.

Seeds: runs whose overrides differ only in `seed=` (`python train.py ... seed=1,2,3 -m`) form a
group; below the table each group with at least two seeds shows the mean of the sort metric with
a 95% interval - a bootstrap over seeds x prompts for stage=eval runs, Student's t over the seeds
otherwise - and each group against the next best with the interval of their difference, marked
"within noise" when it crosses 0: a winner by less than that is not a winner (rlhf/seeds.py).
compare_seeds.csv and report.html hold the same.

Imports neither torch nor transformers: a whole sweep takes about a second, plot included.
"""

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rlhf import aligners, plots, report
from rlhf.errors import UserError, error_lines
from rlhf.metrics import is_number
from rlhf.runs import read_history, read_json, read_yaml, relative_name
from rlhf.seeds import SEED_COLUMNS, SEED_CSV_NAME, format_seed_rows, seed_groups, seed_rows, write_seed_csv

CSV_NAME = "compare.csv"
PNG_NAME = "compare.png"
NOISE = ("runtime", "samples_per_second", "steps_per_second", "num_tokens")  # throughput, not quality
DIAGNOSTIC = ("logits/", "logps/")  # raw DPO log-probs and logits: in the CSV, off the default table
LOWER_IS_BETTER = ("loss", "runtime", "perplexity")
MISSING = "-"


@dataclass
class Run:
    path: Path
    name: str  # what the table calls it
    status: str  # done | failed | running | incomplete
    overrides: list = field(default_factory=list)  # command-line overrides, hydra.* hidden
    metrics: dict = field(default_factory=dict)  # final metrics (metrics.json)
    history: list = field(default_factory=list)  # history.jsonl lines
    error: str | None = None  # status.json's error, for failed runs


def main(argv=None) -> int:
    """Print the table and write compare.csv / compare.png; return the exit code."""
    args = parse_args(argv)
    try:
        runs = load_runs(args.paths)
        sort_metric = args.sort or default_sort_metric(runs)
        columns = chosen_columns(runs, args.columns, sort_metric)
        check_metrics_exist(runs, [sort_metric, *columns] if args.sort or args.columns else [])
        ascending = sorts_ascending(sort_metric) if args.ascending is None else args.ascending
        runs = sort_runs(runs, sort_metric, ascending)
        print(format_table(runs, columns))
        print_errors(runs)
        seeds = seed_rows(seed_groups(runs, sort_metric, ascending), sort_metric)
        if seeds:
            print("\n" + format_seed_rows(seeds, sort_metric))
        out_dir = Path(args.paths[0])
        write_csv(runs, out_dir / CSV_NAME)
        print(f"wrote {out_dir / CSV_NAME}", file=sys.stderr)
        if seeds:
            write_seed_csv(seeds, out_dir / SEED_CSV_NAME)
            print(f"wrote {out_dir / SEED_CSV_NAME}", file=sys.stderr)
        if plots.plot_curves(runs, args.metric or sort_metric, out_dir / PNG_NAME, explicit=args.metric is not None):
            print(f"wrote {out_dir / PNG_NAME}", file=sys.stderr)
        write_report(runs, columns, args.paths, out_dir, seeds)
    except UserError as err:
        print(error_lines(err), file=sys.stderr)
        return 2
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m rlhf.compare",
        description="Compare runs: table on stdout, compare.csv and compare.png in the first directory.",
    )
    parser.add_argument("paths", nargs="+", metavar="DIR", help="run directories and/or sweep directories")
    parser.add_argument("--sort", metavar="METRIC", help="final metric to sort by (default: eval_loss, else train_loss)")
    parser.add_argument("--metric", metavar="METRIC", help="metric for the right plot panel (default: the sort metric)")
    parser.add_argument("--columns", metavar="A,B,C", help="final metrics to show in the table (default: losses and eval_*)")
    order = parser.add_mutually_exclusive_group()
    order.add_argument(
        "--ascending",
        dest="ascending",
        action="store_const",
        const=True,
        default=None,
        help="smallest first (default for names containing loss/runtime/perplexity)",
    )
    order.add_argument(
        "--descending", dest="ascending", action="store_const", const=False, help="largest first (default for every other metric)"
    )
    return parser.parse_args(argv)


# --- finding and reading runs ---------------------------------------------------------------


def load_runs(paths) -> list:
    """The runs the arguments name, in order, each once: a run reused from another (status.json
    `reused_from`, rlhf.reuse) is that run, so an upstream step shared by a sweep's jobs is one row."""
    base = name_base(Path(paths[0]))
    runs, seen = [], set()
    for path in run_dirs(paths):
        trained_in = Path((read_json(path / "status.json") or {}).get("reused_from") or path).resolve()
        if trained_in not in seen:
            seen.add(trained_in)
            runs.append(load_run(path, relative_name(path, base)))
    return runs


def run_dirs(paths) -> list:
    """Each argument as a run, or its run subdirectories when it is a sweep; a chain (a run whose
    subdirectories are runs: its steps) stands for its steps."""
    found = []
    for arg in paths:
        path = Path(arg)
        jobs = [path] if is_run_dir(path) else sweep_jobs(path)
        if not jobs:
            raise UserError(f"{arg}: not a run directory or a sweep directory")
        for job in jobs:
            found.extend(sweep_jobs(job) or [job])
    return found


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in (".hydra", "metrics.json", "status.json"))


def sweep_jobs(path: Path) -> list:
    """Immediate subdirectories that are runs: numeric names in numeric order, then the rest."""
    if not path.is_dir():
        return []
    jobs = [child for child in path.iterdir() if is_run_dir(child)]
    return sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def name_base(first: Path) -> Path:
    """Run names are relative to the first argument; to its parent when it is itself a run."""
    return (first.parent if is_run_dir(first) else first).resolve()


def load_run(path: Path, name: str) -> Run:
    metrics = read_json(path / "metrics.json")
    status_file = read_json(path / "status.json") or {}
    return Run(
        path=path,
        name=name,
        status=run_status(status_file, metrics),
        overrides=visible_overrides(read_overrides(path)),
        metrics=metrics if isinstance(metrics, dict) else {},
        history=read_history(path / "history.jsonl"),
        error=status_file.get("error"),
    )


def run_status(status_file: dict, metrics) -> str:
    if status_file.get("status"):
        return str(status_file["status"])
    return "done" if metrics is not None else "incomplete"


def read_overrides(run_dir: Path) -> list:
    overrides = read_yaml(run_dir / ".hydra" / "overrides.yaml")
    return [str(item) for item in overrides] if isinstance(overrides, list) else []


def visible_overrides(overrides: list) -> list:
    """The user's overrides, without Hydra's own (hydra.sweep.dir=..., hydra.run.dir=...)."""
    return [item for item in overrides if not item.lstrip("+~").startswith("hydra.")]


# --- choosing metrics and order ---------------------------------------------------------------


def all_metric_names(runs) -> list:
    """Every final metric name, in the order the runs first report them."""
    return list(dict.fromkeys(name for run in runs for name in run.metrics))


def default_sort_metric(runs) -> str:
    return "eval_loss" if any("eval_loss" in run.metrics for run in runs) else "train_loss"


def chosen_columns(runs, columns_arg: str | None, sort_metric: str) -> list:
    if columns_arg:
        return [name.strip() for name in columns_arg.split(",") if name.strip()]
    shown = [name for name in all_metric_names(runs) if is_headline_metric(name)]
    if sort_metric not in shown:
        shown.append(sort_metric)
    return shown


def is_headline_metric(name: str) -> bool:
    headline = name.startswith("train_loss") or name.startswith("eval_")
    return headline and not any(word in name for word in NOISE + DIAGNOSTIC)


def check_metrics_exist(runs, names) -> None:
    """A metric the user named that no run has is a typo, unless no run has metrics at all."""
    known = all_metric_names(runs)
    if not known:
        return
    for name in names:
        if name not in known:
            raise UserError(f"no run has the metric {name!r}; they have: {', '.join(known)}")


def sorts_ascending(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


def sort_runs(runs, metric: str, ascending: bool) -> list:
    """Best first by `metric`; runs without a numeric value keep their order, last."""
    scored = [run for run in runs if is_number(run.metrics.get(metric))]
    unscored = [run for run in runs if not is_number(run.metrics.get(metric))]
    return sorted(scored, key=lambda run: run.metrics[metric], reverse=not ascending) + unscored


# --- table and CSV ---------------------------------------------------------------------------


def format_table(runs, columns) -> str:
    header = ["run", "status", "overrides", *columns]
    rows = [
        [run.name, run.status, " ".join(run.overrides) or MISSING, *(format_value(run.metrics.get(name)) for name in columns)]
        for run in runs
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    text_columns = 3  # left-aligned; metric columns are right-aligned

    def line(cells):
        return "  ".join(cell.ljust(w) if i < text_columns else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def format_value(value) -> str:
    if value is None:
        return MISSING
    return f"{value:.4g}" if is_number(value) else str(value)


def print_errors(runs) -> None:
    failed = [run for run in runs if run.error]
    if failed:
        print()
        for run in failed:
            print(f"{run.name}: {run.status}: {run.error}")


def write_csv(runs, path: Path) -> None:
    """Every final metric of every run, after its name, status and overrides."""
    columns = ["run", "status", "overrides", *all_metric_names(runs)]
    rows = [{**run.metrics, "run": run.name, "status": run.status, "overrides": " ".join(run.overrides)} for run in runs]
    report.write_csv(path, columns, [{key: row.get(key, "") for key in columns} for row in rows])


# --- runs that differ only in their seed ------------------------------------------------------

# --- the aligner comparison and the HTML report ----------------------------------------------

REPORT_NAME = "report.html"


def write_report(runs, columns: list, paths: list, out_dir: Path, seeds: list = ()) -> None:
    """report.html (and, when the runs hold an aligner comparison, compare_aligners.csv and
    frontier.png) in `out_dir`; `seeds`: the seed groups' rows (`seed_rows`)."""
    sections = [("runs", report.table(["run", "status", "overrides", *columns], table_rows(runs, columns)))]
    if seeds:
        cells = [[format_value(row[key]) if row[key] is not None else MISSING for key in SEED_COLUMNS] for row in seeds]
        sections.append(("runs that differ only in their seed", report.table(list(SEED_COLUMNS), cells)))
    curves = plots.report_curves_png(runs)
    if curves:
        sections.append(("training curves", report.figure(curves, "each run's curves over its training steps")))
    comparison = aligners.rows([run.path for run in runs], name_base(Path(paths[0])))
    if comparison:
        aligners.write_csv(comparison, out_dir / aligners.CSV_NAME)
        print("\n" + aligners.format_table(comparison))
        print(f"wrote {out_dir / aligners.CSV_NAME}", file=sys.stderr)
        header = list(aligners.COLUMNS)
        cells = [[format_value(row[key]) if row[key] is not None else MISSING for key in header] for row in comparison]
        sections.insert(0, ("aligners compared with the SFT policy", report.table(header, cells)))
        if aligners.plot_frontier(comparison, out_dir / aligners.PNG_NAME):
            print(f"wrote {out_dir / aligners.PNG_NAME}", file=sys.stderr)
            png = (out_dir / aligners.PNG_NAME).read_bytes()
            sections.insert(1, ("reward-KL frontier", report.figure(png, "judge (filled) and proxy (hollow) score against KL")))
    try:
        (out_dir / REPORT_NAME).write_text(report.page(f"runs in {out_dir}", sections), encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write {out_dir / REPORT_NAME}: {err.strerror or err}") from None
    print(f"wrote {out_dir / REPORT_NAME}", file=sys.stderr)


def table_rows(runs, columns: list) -> list:
    return [[run.name, run.status, " ".join(run.overrides), *(format_value(run.metrics.get(c, MISSING)) for c in columns)] for run in runs]


if __name__ == "__main__":
    sys.exit(main())
