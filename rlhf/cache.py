"""The project's cache directory and the one way things are built into it: whole, once, checked.

Models converted or built once (the tiny model, SmolLM2, merged lineages) and DPO's reference
log-probs live here, shared by every run and sweep job on the machine. An entry built by
`build_once` carries a manifest of its files (size, modification time, sha256), written last:
an entry that no longer matches it - a file cut short or rewritten, a build that died before
the manifest - is rebuilt, with one line saying why, instead of failing deep inside a loader.
"""

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

MANIFEST = "rlhf_manifest.json"  # in every built entry, written after everything else

# The entries runs compute (beside them: base models converted once). Named here, once, because
# bench/learning.py starts its runs from a cache without these: a name spelled twice could drift.
MERGED_LINEAGE_PREFIX = "merged-"  # a lineage's adapters folded into its base (rlhf.lineage)
REFERENCE_LOGPS = "ref_logps"  # DPO's reference log-probs of a split (rlhf.ref_logps)
EVAL_REFERENCES = "eval_reference"  # a start's answers and scores for stage=eval (rlhf.stages.eval)
FINISHED_STEPS = "steps"  # the registry of finished pipeline and sweep steps (rlhf.reuse)
RUN_MADE = (MERGED_LINEAGE_PREFIX, REFERENCE_LOGPS, EVAL_REFERENCES, FINISHED_STEPS)


def cache_dir() -> Path:
    """The project's cache: $RLHF_CACHE, else ~/.cache/rlhf."""
    return Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf")).expanduser()


def build_once(target: Path, build) -> Path:
    """`target`, built by `build(directory)` unless it is already there and intact. One process
    builds while the others wait on a lock (torchrun ranks, parallel sweep jobs); the build goes
    to a directory beside the target, renamed when complete, so nobody sees half a model."""
    if problem(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.with_name(target.name + ".lock")):
        reason = problem(target)
        if reason is None:  # another process built it while this one waited
            return target
        if target.exists():
            print(f"cache: rebuilding {target} ({reason})", file=sys.stderr, flush=True)
            shutil.rmtree(target)
        started = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
        try:
            build(staging)
            write_manifest(staging)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        print(f"cache: built {target} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return target


def problem(entry: Path) -> str | None:
    """Why `entry` cannot be used as it is, or None when it matches its manifest. Sizes are
    always compared; a file whose modification time changed is hashed again (a copied cache
    keeps its digests valid without rehashing gigabytes on every load)."""
    manifest = entry / MANIFEST
    if not manifest.is_file():
        return "no manifest: an unfinished or older build" if entry.exists() else "not built yet"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, expected in files.items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        stat = path.stat()
        if stat.st_size != expected["size"]:
            return f"{name} has {stat.st_size} bytes, {expected['size']} expected"
        if stat.st_mtime_ns != expected["mtime_ns"] and sha256_file(path) != expected["sha256"]:
            return f"{name} changed since it was built"
    return None


def write_manifest(entry: Path) -> None:
    files = {}
    for path in sorted(p for p in entry.rglob("*") if p.is_file()):
        stat = path.stat()
        files[str(path.relative_to(entry))] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}
    (entry / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive_lock(lock_path: Path):
    """Hold an exclusive lock on `lock_path` (created if needed) for the block; others wait. The
    kernel drops the lock when its holder dies, so a killed build never blocks the next one."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): the rename in build_once still keeps entries whole
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
