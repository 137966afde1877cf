"""Reusing a finished run instead of training the same thing again.

A sweep over PPO's kl_coef (`experiment=rlhf_chain ppo.kl_coef=0.05,0.1,0.2 -m`) would train
the same SFT and reward model once per job. Instead every run that finishes is registered in the
project cache ($RLHF_CACHE/steps/) under its identity: the resolved config (less what changes no
result: the run's name, resume, reuse, the logger), every earlier run it reads by the content of
its weights (`model.init_from`, the reward model, eval's policy and judge), its data files and
base model by content (its weights, config and tokenizer files), the number of processes and the
training code and library versions. A later run - a chain step, a sweep job, a plain
`python train.py` - with the same identity is reused: its run directory is filled with copies of
the registered run's outputs (a reflink where the filesystem has them, else a plain copy: never
a hard link, through which a write into one run's final/ would change the other's), and every
copied file is checked against the sha256 recorded when that run finished; a file changed since
(or missing) makes the run train anew, said in one line. Every loader and plain peft then use it
as if it had trained there, and its status.json says `reused_from`. `reuse=false` or
`resume=overwrite` trains anew.

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
from rlhf.runs import is_main_process, read_json, write_json, write_status

NO_EFFECT_KEYS = ("run_name", "resume", "reuse", "logger")  # settings that change no weight or metric of a run
COPIED_OUTPUTS = ("final", "metrics.json", "history.jsonl", "samples.jsonl", "env.json")  # what a trained run leaves
FICLONE = 0x40049409  # Linux's ioctl that makes `dst` share `src`'s blocks copy-on-write (btrfs, XFS, ...)
CODE_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes")


def registry() -> Path:
    return cache_dir() / FINISHED_STEPS


@contextlib.contextmanager
def reuse_or_train(cfg, run_dir: Path, runs: dict | None = None):
    """Around a run's training: yields the metrics of an identical finished run, copied into
    `run_dir` (then the caller trains nothing), or None (the caller trains). A run that trains
    to the end is registered for later ones. The lock is held throughout, so identical jobs
    started together wait for the one that trains."""
    single_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
    look = bool(cfg.get("reuse", True)) and cfg.get("resume", "auto") != "overwrite" and single_process
    key = step_key(cfg, runs)
    lock = exclusive_lock(registry() / f"{key}.lock") if look else contextlib.nullcontext()
    registry().mkdir(parents=True, exist_ok=True)
    with lock:
        source, recorded = registered_run(key) if look else (None, None)
        if source is not None and source.resolve() != run_dir.resolve():
            reused = copy_run(source, run_dir, key, recorded)
            if reused is not None:
                print(
                    f"reuse: {run_dir} is identical to {source} (same config, inputs and code): reused; reuse=false trains anew", flush=True
                )
                yield reused
                return
        yield None
        if is_main_process() and read_json(run_dir / "status.json", {}).get("status") == "done":
            write_json(run_dir / "status.json", {**read_json(run_dir / "status.json", {}), "identity": key})
            write_json(registry() / f"{key}.json", {"run_dir": str(run_dir.resolve()), "files": output_digests(run_dir)})


def registered_run(key: str) -> tuple:
    """(the registered run of this identity, the sha256 of each of its outputs as it finished),
    or (None, None) when there is none or it is no longer there as it finished (since
    overwritten or deleted)."""
    entry = read_json(registry() / f"{key}.json", None)
    if entry is None:
        return None, None
    source = Path(entry["run_dir"])
    status = read_json(source / "status.json", {})
    if status.get("status") != "done" or status.get("identity") != key or not (source / "final").is_dir():
        return None, None
    return source, entry.get("files")


def output_files(run_dir: Path) -> list:
    """The files of a run's outputs (COPIED_OUTPUTS), relative to the run directory."""
    files = []
    for name in COPIED_OUTPUTS:
        path = run_dir / name
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
        files += [str(p.relative_to(run_dir)) for p in found]
    return files


def output_digests(run_dir: Path) -> dict:
    """The sha256 of every output file of a finished run, by its path in the run directory."""
    return {name: sha256_file(run_dir / name) for name in output_files(run_dir)}


def copy_run(source: Path, run_dir: Path, key: str, recorded: dict | None) -> dict | None:
    """Fill `run_dir` with copies of the outputs of `source` (`clone_or_copy`: no file is shared,
    so a write into one run never changes the other) and check every copy against the digests
    `recorded` when `source` finished; return the metrics, or None - the copies removed, one line
    saying why - when anything differs (then the run trains anew)."""
    remove_outputs(run_dir)
    for name in COPIED_OUTPUTS:
        src, dst = source / name, run_dir / name
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=clone_or_copy)
        elif src.is_file():
            clone_or_copy(src, dst)
    problem = differing_output(run_dir, recorded)
    if problem is not None:
        remove_outputs(run_dir)
        print(f"reuse: {source} does not hold what it finished with ({problem}): training anew", flush=True)
        return None
    write_status(run_dir, "done", identity=key, reused_from=str(source.resolve()))
    return json.loads((run_dir / "metrics.json").read_text())


def remove_outputs(run_dir: Path) -> None:
    for name in COPIED_OUTPUTS:
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)
        else:
            (run_dir / name).unlink(missing_ok=True)


def differing_output(run_dir: Path, recorded: dict | None) -> str | None:
    """What in the copied outputs differs from what their run recorded when it finished, or None."""
    if not recorded:
        return "it recorded no digests of its files when it finished"
    copied = set(output_files(run_dir))
    for name, digest in sorted(recorded.items()):
        if name not in copied:
            return f"{name} is missing"
        if sha256_file(run_dir / name) != digest:
            return f"{name} changed"
    extra = sorted(copied - set(recorded))
    return f"{extra[0]} was added" if extra else None


def clone_or_copy(src, dst) -> None:
    """`dst` a file of its own with `src`'s content and times: a reflink (shared blocks, copied on
    the first write to either) where the filesystem has them, else a plain copy."""
    try:
        import fcntl

        with open(src, "rb") as source, open(dst, "wb") as target:
            fcntl.ioctl(target.fileno(), FICLONE, source.fileno())
        shutil.copystat(src, dst)
    except (ImportError, OSError):  # no reflinks here (ext4, overlayfs, tmpfs, another filesystem)
        shutil.copy2(src, dst)


def step_key(cfg, runs: dict | None = None) -> str:
    return hashlib.sha256(json.dumps(step_identity(cfg, runs), sort_keys=True, default=str).encode()).hexdigest()[:32]


def step_identity(cfg, runs: dict | None = None) -> dict:
    """Everything a run's result depends on, with paths replaced by the content they name; `runs`:
    the earlier runs the config names, as the run context opened them (opened here without one)."""
    from rlhf.context import open_runs
    from rlhf.data import data_files
    from rlhf.lineage import weights_digest
    from rlhf.models import resolve_model_path

    settings = OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [key for key in cfg if key not in (*NO_EFFECT_KEYS, "hydra")]), resolve=True
    )
    upstream = {}
    # Each earlier run: by the weights it stands on and the weights it saved, wherever it lies.
    for key, run in (open_runs(cfg) if runs is None else runs).items():
        lineage = run.lineage
        upstream[key] = [
            weights_digest(lineage.base_path()),
            lineage.adapter_digests(),
            [model_files_digest(directory) for directory in (lineage.base_path(), *lineage.adapters)],  # config, tokenizer
        ]
        if run.head == "reward":  # PPO, GRPO, RLOO and eval cut (prompt, answer) rows to the length it trained on
            upstream[key].append(run.input_length())
        parent, _, leaf = key.rpartition(".")
        settings[parent][leaf] = None
    model = cfg.get("model")
    base = None
    if model is not None and not model.get("init_from"):
        base_path = resolve_model_path(model)
        base = [weights_digest(base_path), model_files_digest(base_path)]
    dataset = cfg.get("dataset")
    data = None
    if dataset is not None and dataset.get("path"):
        data = [sha256_of(path) for path in data_files(dataset.path, dataset.get("split"))]
        settings["dataset"]["path"] = None  # the same file elsewhere is the same data
    # A Trainer's batch is per device x accumulation x processes, and PPO splits its batch over them.
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    return {"settings": settings, "upstream": upstream, "base": base, "data": data, "processes": processes, "code": code_identity()}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # by content in weights_digest / adapter_digests
# Written by the project with paths in them, or saying nothing of what the model computes.
NOT_MODEL_FILES = ("lineage.json", "rlhf_manifest.json", "README.md", "training_args.bin")
PATH_KEYS = ("base_model_name_or_path", "revision")  # adapter_config.json's pointer to where its base lies


def model_files_digest(directory) -> str:
    """One sha256 over the files beside a model's weights that change what it computes or reads:
    config.json, generation_config.json, the tokenizer's files and chat template, an adapter's
    settings (rank, alpha, targets; not the path of its base), by content."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if not path.is_file() or path.name.endswith(WEIGHT_SUFFIXES) or path.name in NOT_MODEL_FILES or path.name.startswith("."):
            continue
        if path.name == "adapter_config.json":
            settings = {key: value for key, value in json.loads(path.read_text()).items() if key not in PATH_KEYS}
            digest.update(f"{path.name}:{json.dumps(settings, sort_keys=True)}\n".encode())
        else:
            digest.update(f"{path.name}:{sha256_of(path)}\n".encode())
    return digest.hexdigest()


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
