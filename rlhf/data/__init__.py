"""Loading training data: read a file row by row, convert each row through its format, and
split off a held-out set. Every bad row is reported with file, line and reason."""

import gzip
import json
from pathlib import Path

from rlhf.data.formats import FORMATS, RowError
from rlhf.errors import UserError

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).parent / "builtin"


def load_splits(dataset_cfg, kind: str):
    """(train, eval) `datasets.Dataset`s of records of `kind`; eval is None when test_size is 0."""
    from datasets import Dataset

    fmt = FORMATS.get(dataset_cfg.format)
    if fmt is None:
        raise UserError(f"dataset.format={dataset_cfg.format} is unknown; valid formats: {', '.join(sorted(FORMATS))}")
    if fmt.kind != kind:
        raise UserError(
            f"this stage trains on {kind} data, but dataset.format={dataset_cfg.format} holds {fmt.kind} data; "
            f"choose a {kind} dataset (formats: {', '.join(n for n, f in sorted(FORMATS.items()) if f.kind == kind)})"
        )
    path = data_path(dataset_cfg.path)
    records = []
    for where, row in read_rows(path):
        if dataset_cfg.max_samples is not None and len(records) >= dataset_cfg.max_samples:
            break
        try:
            records.append(fmt.convert(row))
        except RowError as err:
            raise UserError(f"{path}, {where}: {err} (format {dataset_cfg.format} reads: {fmt.fields})") from None
    if not records:
        raise UserError(f"{path}: no rows to train on")
    dataset = Dataset.from_list(records)
    test_size = dataset_cfg.test_size
    if not test_size:
        return dataset, None
    if len(dataset) < 2:
        raise UserError(f"{path}: {len(dataset)} row(s) cannot be split into train and eval; set dataset.test_size=0")
    split = dataset.train_test_split(test_size=test_size, seed=dataset_cfg.seed)
    return split["train"], split["test"]


def data_path(path: str) -> Path:
    """`builtin:<file>` names a file shipped in rlhf/data/builtin; anything else is a local path."""
    path = str(path)
    if path.startswith(BUILTIN_PREFIX):
        resolved = BUILTIN_DIR / path[len(BUILTIN_PREFIX):]
    else:
        resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise UserError(f"dataset.path={path}: no such file")
    return resolved


def read_rows(path: Path):
    """Yield (location, row) from a JSON array or a JSON Lines file (optionally .gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
        for index, row in enumerate(rows):
            yield f"row {index + 1}", row
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
        yield f"line {number}", row
