"""Reusing a finished run instead of training the same thing again.

A sweep over PPO's kl_coef (`experiment=rlhf_chain ppo.kl_coef=0.05,0.1,0.2 -m`) would train
the same SFT and reward model once per job. Instead every run that finishes is registered in the
project cache ($RLHF_CACHE/steps/) under its identity: the resolved config (less what changes no
result: the run's name, resume, reuse, the logger), every earlier run it reads by the content of
its weights (`model.init_from`, the reward model, eval's policy and judge), its data files and
base model by content, and the training code and library versions. A later run - a chain step,
a sweep job, a plain `python train.py` - with the same identity is reused: its run directory is
filled from the registered one (weights hard-linked where the filesystem allows, metadata
copied) so that every loader and plain peft use it as if it had trained there, and its
status.json says `reused_from`. `reuse=false` or `resume=overwrite` trains anew.

Parallel jobs (joblib, gpu_pool, SLURM arrays on a shared filesystem) agree through a lock per
identity: one trains while the others wait, then reuse what it registered. The kernel releases
the lock of a job that dies (the stale-lock rule), and only a finished run is registered, so a
failed step is never reused: the next job in line trains it. A multi-process launch (torchrun)
trains without looking (its ranks would have to agree on the answer) and registers the result.
"""

import contextlib
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from rlhf import PROJECT_ROOT, package_versions
from rlhf.cache import FINISHED_STEPS, cache_dir, exclusive_lock, sha256_file
from rlhf.runs import RUN_INPUTS, is_main_process, read_json, write_json, write_status

NO_EFFECT_KEYS = ("run_name", "resume", "reuse", "logger")  # settings that change no weight or metric of a run
LINKED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # large and never rewritten in place: hard-linked
COPIED_OUTPUTS = ("final", "metrics.json", "history.jsonl", "samples.jsonl", "env.json")  # what a trained run leaves
CODE_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes")


def registry() -> Path:
    return cache_dir() / FINISHED_STEPS


@contextlib.contextmanager
def reuse_or_train(cfg, run_dir: Path):
    """Around a run's training: yields the metrics of an identical finished run, copied into
    `run_dir` (then the caller trains nothing), or None (the caller trains). A run that trains
    to the end is registered for later ones. The lock is held throughout, so identical jobs
    started together wait for the one that trains."""
    single_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
    look = bool(cfg.get("reuse", True)) and cfg.get("resume", "auto") != "overwrite" and single_process
    key = step_key(cfg)
    lock = exclusive_lock(registry() / f"{key}.lock") if look else contextlib.nullcontext()
    registry().mkdir(parents=True, exist_ok=True)
    with lock:
        source = registered_run(key) if look else None
        if source is not None and source.resolve() != run_dir.resolve():
            print(f"reuse: {run_dir} is identical to {source} (same config, inputs and code): reused; reuse=false trains anew", flush=True)
            yield copy_run(source, run_dir, key)
            return
        yield None
        if is_main_process() and read_json(run_dir / "status.json", {}).get("status") == "done":
            write_json(run_dir / "status.json", {**read_json(run_dir / "status.json", {}), "identity": key})
            write_json(registry() / f"{key}.json", {"run_dir": str(run_dir.resolve())})


def registered_run(key: str) -> Path | None:
    """The registered run of this identity, if it is still there as it finished (not since
    overwritten or deleted)."""
    entry = read_json(registry() / f"{key}.json", None)
    if entry is None:
        return None
    source = Path(entry["run_dir"])
    status = read_json(source / "status.json", {})
    if status.get("status") != "done" or status.get("identity") != key or not (source / "final").is_dir():
        return None
    return source


def copy_run(source: Path, run_dir: Path, key: str) -> dict:
    """Fill `run_dir` with the outputs of `source`: weights hard-linked (a copy across
    filesystems), every other file copied, so that rewriting one never changes the other."""
    for name in COPIED_OUTPUTS:
        src, dst = source / name, run_dir / name
        if dst.is_dir():
            shutil.rmtree(dst)
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=link_or_copy)
        elif src.is_file():
            shutil.copy2(src, dst)
    write_status(run_dir, "done", identity=key, reused_from=str(source.resolve()))
    return json.loads((run_dir / "metrics.json").read_text())


def link_or_copy(src: str, dst: str) -> None:
    if src.endswith(LINKED_SUFFIXES):
        try:
            os.link(src, dst)
            return
        except OSError:  # another filesystem, or links not allowed
            pass
    shutil.copy2(src, dst)


def step_key(cfg) -> str:
    return hashlib.sha256(json.dumps(step_identity(cfg), sort_keys=True, default=str).encode()).hexdigest()[:32]


def step_identity(cfg) -> dict:
    """Everything a run's result depends on, with paths replaced by the content they name."""
    from rlhf.data import data_files
    from rlhf.lineage import TrainedRun, weights_digest
    from rlhf.models import resolve_model_path

    settings = OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [key for key in cfg if key not in (*NO_EFFECT_KEYS, "hydra")]), resolve=True
    )
    upstream = {}
    for key, (_, stages) in RUN_INPUTS.items():
        path = OmegaConf.select(cfg, key)
        if path:  # an earlier run: by the weights it stands on and the weights it saved, wherever it lies
            lineage = TrainedRun.of(path, key, stages).lineage
            upstream[key] = [weights_digest(lineage.base_path()), lineage.adapter_digests()]
            parent, _, leaf = key.rpartition(".")
            settings[parent][leaf] = None
    model = cfg.get("model")
    base = weights_digest(resolve_model_path(model)) if model is not None and not model.get("init_from") else None
    dataset = cfg.get("dataset")
    data = None
    if dataset is not None and dataset.get("path"):
        data = [sha256_of(path) for path in data_files(dataset.path, dataset.get("split"))]
        settings["dataset"]["path"] = None  # the same file elsewhere is the same data
    return {"settings": settings, "upstream": upstream, "base_weights": base, "data": data, "code": code_identity()}


@functools.lru_cache(maxsize=256)
def _sha256_at(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def sha256_of(path: Path) -> str:
    """A file's sha256, computed once per process and state (a sweep reads the same data often)."""
    stat = path.stat()
    return _sha256_at(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def code_identity() -> list:
    """The training code (every file of the rlhf package, its built-in data included) and the
    versions of the libraries that compute with it."""
    package = PROJECT_ROOT / "rlhf"
    files = sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(package)}:{sha256_of(path)}\n".encode())
    return [digest.hexdigest(), package_versions(CODE_PACKAGES)]
