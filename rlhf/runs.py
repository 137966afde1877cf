"""Run directories: claiming one for a run (refusing to overwrite a finished run), its
status, its checkpoints, the summary of a sweep, and finding finished runs that a stage starts
from (`model.init_from`, `ppo.reward_model`; `rlhf.lineage` reads what they stand on)."""

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from rlhf.errors import UserError
from rlhf.registry import EVERY_STAGE_READS, POLICY, RENAMED_TARGETS, STAGES, making


def finished_run(path, key: str, stages: tuple = ()):
    """The saved config of the finished run at `path`; `key` names the setting that pointed
    there, for the error message; `stages` limits which stages may be named."""
    run_dir = Path(str(path)).expanduser()
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise UserError(f"{key}={path}: not a run directory (no .hydra/config.yaml there)")
    if read_status(run_dir) != "done" or not (run_dir / "final").is_dir():
        raise UserError(f"{key}={path}: that run did not finish (no metrics.json or final/); run it to the end first")
    cfg = OmegaConf.load(saved)
    if stages and cfg.get("stage") not in stages:
        raise UserError(f"{key}={path}: that is a stage={cfg.get('stage')} run; expected one of: {', '.join(stages)}")
    return cfg


POLICY_STAGES = making(POLICY)  # runs whose final/ is a policy (a run may start from these)
# Settings that name an earlier run: key -> (the stage that cannot do without it, or None; the stages that run may be).
RUN_INPUTS = {
    key: (name if needed else None, making(what))
    for name, stage in [(None, None), *STAGES.items()]
    for key, (what, needed) in (stage.reads if stage else EVERY_STAGE_READS).items()
}


def check_input_runs(cfg) -> None:
    """Every earlier run the config names is a finished run of a fitting stage, and the stage has
    the ones it cannot do without."""
    for key, (needed_by, stages) in RUN_INPUTS.items():
        value = OmegaConf.select(cfg, key)
        if needed_by == cfg.get("stage") and not value:
            raise UserError(
                f"{key}={value or 'null'}: stage={cfg.stage} needs {key}=<directory of a finished stage={'/'.join(stages)} run>"
            )
        if value:
            finished_run(value, key, stages=stages)


# ---- the lifecycle of a run directory --------------------------------------------------------

CHECKPOINT_MARK = "rlhf_checkpoint.json"  # written last: a checkpoint without it is incomplete
RESUME_MODES = ("auto", "overwrite")
RUN_OUTPUTS = (
    "metrics.json",
    "status.json",
    "history.jsonl",
    "env.json",
    "checkpoints",
    "final",
    "samples.jsonl",
    "wandb_id.txt",
    "wandb",
    "tensorboard",
)  # what resume=overwrite clears: everything a run writes


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (or a plain single process): the one that writes."""
    return int(os.environ.get("RANK", "0")) == 0


UMASK = os.umask(0o022)  # read (and put back at once): mkstemp creates private files, run directories are shared
os.umask(UMASK)


def write_atomically(path: Path, write) -> None:
    """Whole or not at all: `write(temporary path)` into a file of its own beside `path` (two
    writers of one file - parallel sweep jobs, two ranks - never share one), renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # as open() would create it: readable by whoever reads the run directory
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_json(path: Path, default=None):
    """The file's JSON value, or `default` when it is missing or unreadable (a run cut off mid-write)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def read_yaml(path: Path):
    """The file's YAML value (a saved config, overrides.yaml), or None when it is missing or unreadable."""
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def relative_name(path: Path, base: Path) -> str:
    """How a table names a run: its path relative to `base` ("." for base itself), else the path as given."""
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def write_status(run_dir: Path, status: str, error: str | None = None, **details) -> None:
    """status.json: running, done or failed (with the error), and what else a reader needs (`reused_from`)."""
    write_json(run_dir / "status.json", {"status": status, "error": error, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **details})


def read_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "status.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return "done" if (run_dir / "metrics.json").is_file() else None


RUN_LOCK = ".rlhf_run.lock"  # held by the process running in the directory; names it (host, pid, since when)


@contextlib.contextmanager
def holding_run_dir(run_dir: Path):
    """Hold `run_dir` for the block, for one process: two runs writing one directory (the same
    command in two terminals) would each write checkpoints, history and final/ there. A second
    process is refused in one line naming the first. The kernel drops the lock when its holder
    dies, so a killed run never blocks the next. Under torchrun rank 0 holds it for the launch."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): not guarded
        fcntl = None
    if fcntl is None or not is_main_process():
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / RUN_LOCK, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"{run_dir} is in use by {holder}; wait for that run to end, or choose another hydra.run.dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"host {socket.gethostname()} pid {os.getpid()} (since {time.strftime('%Y-%m-%dT%H:%M:%S')})")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_run_dir(cfg, run_dir: Path, overrides: list, hydra_node=None, write: bool = True) -> None:
    """Claim `run_dir` for this config: refuse to overwrite a finished run or to resume a
    different config (unless resume=overwrite), then save .hydra/ (config, overrides, Hydra's
    settings) as Hydra would, atomically."""
    mode = cfg.get("resume", "auto")
    if mode not in RESUME_MODES:
        raise UserError(f"resume={mode}: must be one of {', '.join(RESUME_MODES)}")
    job_cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    saved = run_dir / ".hydra" / "config.yaml"
    if mode == "overwrite" and write:
        for name in RUN_OUTPUTS:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    elif read_status(run_dir) == "done":
        raise UserError(f"{run_dir} holds a finished run; pass resume=overwrite to replace it, or choose another hydra.run.dir")
    elif saved.is_file() and last_complete_checkpoint(run_dir) and comparable(OmegaConf.load(saved)) != comparable(job_cfg):
        raise UserError(
            f"{run_dir} holds an interrupted run of a different config; pass resume=overwrite to start over there, "
            "or choose another hydra.run.dir"
        )
    if not write:  # another rank of the same launch writes
        return
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(job_cfg, hydra_dir / "config.yaml")
    save_yaml(OmegaConf.create(list(overrides)), hydra_dir / "overrides.yaml")
    if hydra_node is not None:
        save_yaml(OmegaConf.create({"hydra": hydra_node}), hydra_dir / "hydra.yaml")


def comparable(cfg) -> dict:
    """A config as compared for resuming: everything but the resume mode and the display name
    (a chain names its steps after all of its overrides, even those of other steps), with the
    settings classes that moved under their current names (RENAMED_TARGETS)."""
    plain = OmegaConf.to_container(cfg)
    plain.pop("resume", None)
    plain.pop("run_name", None)
    return current_targets(plain)


def current_targets(node):
    """`node` (a plain config) with every `_target_` that moved renamed to where it is now."""
    if isinstance(node, dict):
        return {
            key: RENAMED_TARGETS.get(value, value) if key == "_target_" and isinstance(value, str) else current_targets(value)
            for key, value in node.items()
        }
    return [current_targets(item) for item in node] if isinstance(node, list) else node


def finished_with(run_dir: Path, cfg) -> bool:
    """Whether `run_dir` holds a finished run of this very config (a re-run has nothing to do)."""
    saved = run_dir / ".hydra" / "config.yaml"
    if read_status(run_dir) != "done" or not saved.is_file():
        return False
    job_cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    return comparable(OmegaConf.load(saved)) == comparable(job_cfg)


def save_yaml(node, path: Path) -> None:
    write_atomically(path, lambda tmp: OmegaConf.save(node, tmp))


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose writing finished (it holds CHECKPOINT_MARK)."""
    complete = [path.parent for path in (run_dir / "checkpoints").glob(f"checkpoint-*/{CHECKPOINT_MARK}")]
    return max(complete, key=checkpoint_step, default=None)


def checkpoint_step(path: Path) -> int:
    """The step a `checkpoint-<step>` directory was written at."""
    return int(path.name.rsplit("-", 1)[1])


def resume_point(cfg, run_dir: Path) -> tuple:
    """(checkpoint, its mark) to go on from under resume=auto, or (None, {"step": 0}) to start
    afresh. Either way history.jsonl keeps only the lines up to that step: a resumed run logs
    the later steps again, and a run that died before its first checkpoint starts over."""
    checkpoint = last_complete_checkpoint(run_dir) if cfg.resume == "auto" else None
    mark = json.loads((checkpoint / CHECKPOINT_MARK).read_text()) if checkpoint else {"step": 0}  # now: rotation may delete it
    if checkpoint is not None:
        print(f"resuming from {checkpoint}", flush=True)
    if is_main_process():
        truncate_history(run_dir / "history.jsonl", after_step=mark["step"])
    return checkpoint, mark


def read_history(path: Path) -> list:
    """The JSON lines of history.jsonl; a half-written last line (crash) is skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    lines = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            lines.append(record)
    return lines


def append_history(path: Path, record: dict) -> None:
    """One line of history.jsonl, written as it happens, so a crashed run keeps its history."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def truncate_history(path: Path, after_step: int) -> None:
    """Drop history lines logged after `after_step`: a resumed run logs those steps again."""
    if path.is_file():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= after_step:
                    kept.append(line)
            except ValueError:  # a line cut short by the crash
                continue
        path.write_text("".join(line + "\n" for line in kept))


class SweepSummary(Callback):
    """After a multirun: one line per job (done or failed, with the error), and a non-zero exit
    when any job failed. Jobs record their own status.json, so a failing job never stops the
    others (see rlhf.command.main)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        failed = 0
        print(f"sweep summary ({sweep_dir}):")
        for job in jobs:
            try:
                status = json.loads((job / "status.json").read_text())
            except (OSError, ValueError):
                status = {"status": "unknown (no status.json)", "error": None}
            overrides = job / ".hydra" / "overrides.yaml"
            label = ",".join(OmegaConf.load(overrides)) if overrides.is_file() else ""
            failed += status["status"] != "done"
            error = f": {status['error']}" if status.get("error") else ""
            print(f"  job {job.name} [{label}]: {status['status']}{error}")
        if failed:
            print(f"{failed} of {len(jobs)} jobs failed", file=sys.stderr)
            sys.exit(1)
