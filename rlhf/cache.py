"""The project's cache directory and the one way things are built into it: whole or not at all.

Models converted or built once (the tiny model, SmolLM2, merged lineages) and DPO's reference
log-probs live here, shared by every run and sweep job on the machine.
"""

import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """The project's cache: $RLHF_CACHE, else ~/.cache/rlhf."""
    return Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf")).expanduser()


def build_once(target: Path, build) -> Path:
    """`target`, built by `build(directory)` unless an earlier run built it already. The build
    goes to a directory beside the target, renamed when complete: concurrent sweep jobs never
    see half a model, and the loser of a race uses the winner's."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build(staging)
        os.rename(staging, target)
    except OSError:
        if not (target / "config.json").exists():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
