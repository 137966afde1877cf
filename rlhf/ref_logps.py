"""DPO's reference log-probs, cached on disk across runs (`dpo.ref_cache`): one safetensors file
per (reference weights, data, tokenization) key in the project cache, one value per training row
and column, NaN for rows not computed yet. Parallel sweep jobs that reach different rows merge
their values under a lock.
"""

import functools

import torch
from safetensors.torch import load_file, save_file

from rlhf.cache import exclusive_lock
from rlhf.runs import write_atomically

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
REF_ROW = "rlhf_row"  # a training row's index in its split: where the reference log-probs a batch computes belong


def read_ref_cache(path, rows: int, complete: bool = True, say: bool = True):
    """The cached reference log-probs at `path` (NaN for rows not computed yet), or None (said in
    one line) when the file is unreadable, does not hold one value per row, or - `complete` -
    lacks some: the run computes them anew and replaces it."""
    try:
        cached = load_file(str(path))
        if not all(column in cached and cached[column].shape == (rows,) for column in REF_COLUMNS):
            problem = f"it does not hold {rows} values per column"
        elif complete and (missing := int(sum(cached[c].isnan() for c in REF_COLUMNS).gt(0).sum())):
            problem = f"it lacks {missing} of {rows} rows"
        else:
            return cached
    except Exception as err:  # a truncated or foreign file: safetensors raises its own error types
        problem = f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if say:
        print(f"reference log-probs cache {path}: {problem}; computing them anew", flush=True)
    return None


def write_ref_cache(path, columns: dict) -> None:
    """Merge `columns` into the cache file at `path` (NaN = not computed): values another run
    wrote meanwhile are kept, so parallel sweep jobs that reach different rows add up."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(path.with_name(path.name + ".lock")):
        rows = len(columns[REF_COLUMNS[0]])
        current = read_ref_cache(path, rows, complete=False, say=False) if path.is_file() else None
        if current is not None:
            columns = {c: torch.where(columns[c].isnan(), current[c], columns[c]) for c in REF_COLUMNS}
        write_atomically(path, functools.partial(save_file, {c: columns[c].contiguous() for c in REF_COLUMNS}))


def collate_with_rows(collate, examples: list) -> dict:
    """TRL's preference collator, plus each example's row index when the examples carry one."""
    batch = collate(examples)
    if REF_ROW in examples[0]:
        batch[REF_ROW] = torch.tensor([example[REF_ROW] for example in examples])
    return batch
