"""Graceful preemption: a scheduler's signal ends a run with a checkpoint, not with lost work.

SLURM sends SIGTERM before it kills a job, and with `--signal=USR2@<seconds>` a user signal ahead
of the time limit (submitit asks for SIGUSR2 `hydra.launcher.signal_delay_s` before it; SIGUSR1
is the other common choice). Any of them asks the run to stop after the optimizer step (a PPO
update) in progress: the stage writes a complete checkpoint at that step, status.json says
`preempted` with the step, and the process exits with EXIT_CODE. The same command resumes from
that checkpoint (`resume=auto`), as after a crash. A second signal ends the process at once.

A launcher that handled the signal before the run began (submitit requeues the job from its
handler) gets it once the checkpoint is safe: `hand_over`.

Processes of one launch (torchrun, several SLURM tasks) may see the signal at different steps:
they agree through a sum over the processes at every step, so all stop at the same one.
"""

import contextlib
import os
import signal
import threading

from rlhf.errors import UserError

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))
EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure; run the same command again to resume

_asked: list = []  # the signals received by this process, in order
_before: dict = {}  # signal number -> the handler in place before `handled` (a launcher's, or the default)


class Preempted(UserError):
    """Raised after the checkpoint at `step` is complete."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"preempted by a signal: checkpoint at step {step} saved; run the same command again to resume from it")


@contextlib.contextmanager
def handled():
    """Catch SIGNALS for the block (from the main thread only: Python delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _before.update({number: signal.getsignal(number) for number in SIGNALS})
    for number in SIGNALS:
        signal.signal(number, _ask)
    try:
        yield
    finally:
        for number, handler in _before.items():
            signal.signal(number, handler)
        _before.clear()
        _asked.clear()


def hand_over() -> None:
    """Give the first signal received to the Python handler that was in place before `handled`
    (submitit's: it requeues the job, which then runs the same command and resumes). Call it
    once the checkpoint is complete; it may exit the process."""
    previous = _before.get(_asked[0]) if _asked else None
    if callable(previous) and previous is not _ask:
        previous(_asked[0], None)


def _ask(number, frame) -> None:
    if _asked:  # the second signal: no more waiting
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        return
    _asked.append(number)
    print(f"received {signal.Signals(number).name}: stopping after the current step with a checkpoint", flush=True)


def asked() -> bool:
    """Whether any process of the launch has been asked to stop (collective when launched:
    call it at the same point on every process)."""
    from rlhf import distributed

    if not distributed.launched():
        return bool(_asked)
    import torch

    return bool(distributed.all_sum(torch.tensor([float(bool(_asked))])).item() > 0)
