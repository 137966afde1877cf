"""Loading training data: read rows from a file, a directory or the hub, convert each row
through its format, and split off a held-out set.

A bad row stops the run before any model loads, with file, line and reason; with
`dataset.skip_invalid=true` it is skipped instead, and the count is reported in the log and
as `data/skipped_rows` in metrics.json.
"""

import gzip
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rlhf import BUILTIN_PREFIX
from rlhf.data.formats import FORMATS, RowError
from rlhf.errors import UserError, first_line

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent / "builtin"
DATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")
KINDS = ("sft", "preference", "prompt")  # what a stage asks for; "prompt" takes any format's prompts
ANSWERS = ("completion", "chosen", "rejected")  # what a stage that samples its own answers leaves out


@dataclass
class Splits:
    train: object  # datasets.Dataset of records of the requested kind
    eval: object  # the held-out split, or None when dataset.test_size is 0
    skipped_rows: int  # rows dropped by dataset.skip_invalid


def load_splits(dataset_cfg, kind: str) -> Splits:
    """Read, check and convert the configured dataset into records of `kind`, then split."""
    from datasets import Dataset

    fmt = data_format(dataset_cfg, kind)
    records, skipped, source = [], Counter(), None
    passed = dataset_cfg.get("skip_rows") or 0  # valid rows to pass over: a later, disjoint part of the data
    for source, where, row in read_rows(dataset_cfg):
        if dataset_cfg.max_samples is not None and len(records) >= dataset_cfg.max_samples:
            break
        try:
            if isinstance(row, RowError):  # a line that is not valid JSON
                raise row
            record = fmt.convert(row)
        except RowError as err:
            if not dataset_cfg.get("skip_invalid", False):
                raise UserError(
                    f"{source}, {where}: {err} (format {dataset_cfg.format} reads {fmt.fields}; {row_hint(row, fmt)})"
                ) from None
            skipped[str(err)] += 1
            continue
        if passed:
            passed -= 1
            continue
        records.append({k: v for k, v in record.items() if k not in ANSWERS} if kind == "prompt" else record)
    if skipped:
        reasons = "; ".join(f"{count} x {reason}" for reason, count in skipped.most_common())
        log.warning("dataset: skipped %d invalid rows of %s (%s)", sum(skipped.values()), source, reasons)
    if not records:
        why = f" ({sum(skipped.values())} invalid rows skipped: {reasons})" if skipped else ""
        raise UserError(f"dataset {source or describe_source(dataset_cfg)}: no valid rows to train on{why}")
    dataset = Dataset.from_list(records)
    if not dataset_cfg.test_size:
        return Splits(dataset, None, sum(skipped.values()))
    if len(dataset) < 2:
        raise UserError(f"dataset {source}: {len(dataset)} row cannot be split; set dataset.test_size=0")
    split = dataset.train_test_split(test_size=dataset_cfg.test_size, seed=dataset_cfg.seed)
    return Splits(split["train"], split["test"], sum(skipped.values()))


def row_hint(row, fmt) -> str:
    """What to do about a row its format cannot read: the formats of the same kind that can read
    it (the user named the wrong one), else skipping bad rows."""
    fitting = []
    for name, other in FORMATS.items():
        if other.kind == fmt.kind and other.convert is not fmt.convert:  # belle and alpaca read rows alike
            try:
                other.convert(row)
                fitting.append(name)
            except RowError:
                continue
    if fitting:
        return f"the row reads as {' or '.join(f'dataset.format={name}' for name in fitting)}"
    return "dataset.skip_invalid=true skips such rows"


def data_format(dataset_cfg, kind: str):
    """The converter for dataset.format, checked against what the stage needs."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind}")
    fmt = FORMATS.get(dataset_cfg.format)
    if fmt is None:
        raise UserError(f"dataset.format={dataset_cfg.format} is unknown; valid formats: {', '.join(sorted(FORMATS))}")
    if kind != "prompt" and fmt.kind != kind:
        fitting = ", ".join(name for name, other in sorted(FORMATS.items()) if other.kind == kind)
        raise UserError(
            f"this stage trains on {kind} data, but dataset.format={dataset_cfg.format} holds {fmt.kind} data; "
            f"choose a {kind} dataset (formats: {fitting})"
        )
    return fmt


def describe_source(dataset_cfg) -> str:
    return str(dataset_cfg.path) if dataset_cfg.get("path") else f"{dataset_cfg.get('hub_id')} (hub)"


def read_rows(dataset_cfg):
    """Yield (source, location, row) from dataset.path (a file or a directory of files) or,
    when no path is given, from dataset.hub_id."""
    if dataset_cfg.get("path"):
        for path in data_files(dataset_cfg.path, dataset_cfg.get("split")):
            for where, row in read_file(path):
                yield path, where, row
        return
    if not dataset_cfg.get("hub_id"):
        raise UserError("dataset: set dataset.path (a local file or directory) or dataset.hub_id")
    rows = load_from_hub(dataset_cfg.hub_id, dataset_cfg.get("split") or "train")
    for index, row in enumerate(rows):
        yield f"{dataset_cfg.hub_id} (hub)", f"row {index + 1}", row


def data_files(path: str, split) -> list:
    """`builtin:<file>` names a file shipped in rlhf/data/builtin; a directory stands for the
    data files in it (those whose name contains the split, when any does)."""
    path = str(path)
    resolved = BUILTIN_DIR / path[len(BUILTIN_PREFIX) :] if path.startswith(BUILTIN_PREFIX) else Path(path).expanduser()
    if resolved.is_file():
        return [resolved]
    if not resolved.is_dir():
        raise UserError(f"dataset.path={path}: no such file or directory")
    files = sorted(p for p in resolved.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
    if split:
        files = [p for p in files if split in p.name] or files
    if not files:
        raise UserError(f"dataset.path={path}: the directory holds no {', '.join(DATA_SUFFIXES)} files")
    return files


def read_file(path: Path):
    """Yield (location, row) from a JSON array, JSON Lines (either optionally gzipped) or Parquet
    file; a JSON Lines line that does not parse comes as a RowError in place of the row."""
    if path.name.endswith(".parquet"):
        import pyarrow.parquet

        for index, row in enumerate(pyarrow.parquet.read_table(path).to_pylist()):
            yield f"row {index + 1}", row
        return
    if not path.name.endswith(DATA_SUFFIXES):
        raise UserError(f"{path}: unknown file type; use one of {', '.join(DATA_SUFFIXES)}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            content = f.read()
    except (UnicodeDecodeError, OSError) as err:
        raise UserError(f"{path}: cannot be read as UTF-8 text ({err})") from None
    if content.lstrip().startswith("["):  # a JSON array (alpaca, LLaMA-Factory)
        try:
            rows = json.loads(content)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
        for index, row in enumerate(rows):
            yield f"row {index + 1}", row
        return
    for number, line in enumerate(content.splitlines(), start=1):  # JSON Lines (also BELLE's ".json")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            row = RowError(f"not valid JSON ({err.msg})")
        yield f"line {number}", row


def load_from_hub(hub_id: str, split: str):
    """Rows of a hub dataset (downloaded, or from the local datasets cache when offline)."""
    from datasets import load_dataset

    try:
        return load_dataset(hub_id, split=split)
    except Exception as err:  # any hub failure becomes the same actionable line
        raise UserError(
            f"dataset '{hub_id}' (split {split}) could not be loaded from the hub: {first_line(err)}. "
            "Download it where there is network and pass dataset.path=/path/to/file/or/dir"
        ) from None
