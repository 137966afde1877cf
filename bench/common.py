"""What the benchmarks share: running one process with its wall time and peak RSS, and a
`train.py` run that returns the metrics it wrote."""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(command: list, env: dict) -> tuple:
    """(wall seconds, peak RSS in MiB) of one process, run under /usr/bin/time from the project root."""
    handle, name = tempfile.mkstemp()
    os.close(handle)
    rss_file = Path(name)
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *command], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    rss = int(rss_file.read_text().split()[-1]) / 1024
    rss_file.unlink()
    return seconds, rss


def train(run_dir: Path, env: dict, *overrides) -> dict:
    """One `train.py` process: its wall time and peak RSS, and the metrics it wrote."""
    seconds, rss = timed([sys.executable, "train.py", f"hydra.run.dir={run_dir}", *overrides], env)
    return {"process_seconds": seconds, "peak_rss_mib": rss, "metrics": json.loads((run_dir / "metrics.json").read_text())}


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"
