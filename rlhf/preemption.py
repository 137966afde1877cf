"""Graceful stops: a scheduler's signal or the user's Ctrl-C ends a run with a checkpoint, not
with lost work.

SLURM sends SIGTERM before it kills a job, and with `--signal=USR2@<seconds>` a user signal ahead
of the time limit (submitit asks for SIGUSR2 `hydra.launcher.signal_delay_s` before it; SIGUSR1
is the other common choice). Any of them asks the run to stop after the optimizer step (a PPO
update) in progress: the stage writes a complete checkpoint at that step, status.json says
`preempted` with the step, and the process exits with EXIT_CODE. Ctrl-C (SIGINT) in a stage that
trains does the same, with status `stopped` and exit code 130 (the shell's code for Ctrl-C). The
same command resumes from that checkpoint (`resume=auto`), as after a crash. A second signal
(a second Ctrl-C) ends the process at once.

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
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a program ended by Ctrl-C

_asked: list = []  # the signals received by this process, in order
_before: dict = {}  # signal number -> the handler in place before `handled` (a launcher's, or the default)


class Preempted(UserError):
    """Raised after the checkpoint at `step` is complete; says whether the user stopped the run
    (Ctrl-C) or a scheduler did, in its status and exit code."""

    def __init__(self, step: int):
        self.step = step
        self.by_user = bool(_asked) and _asked[0] == signal.SIGINT
        self.status = "stopped" if self.by_user else "preempted"
        self.exit_code = INTERRUPT_EXIT_CODE if self.by_user else EXIT_CODE
        cause = "stopped by Ctrl-C" if self.by_user else "preempted by a signal"
        super().__init__(f"{cause}: checkpoint at step {step} saved; run the same command again to resume from it")


@contextlib.contextmanager
def handled(interrupt: bool = True):
    """Catch SIGNALS for the block (from the main thread only: Python delivers signals there), and
    with `interrupt` Ctrl-C too: a stage that checkpoints stops at its next step boundary. (One that
    does not - eval - is left to Ctrl-C's usual immediate stop.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = (*SIGNALS, signal.SIGINT) if interrupt else SIGNALS
    _before.update({number: signal.getsignal(number) for number in caught})
    for number in caught:
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
    by_user = bool(_asked) and _asked[0] == signal.SIGINT  # Python's own SIGINT handler would raise KeyboardInterrupt
    if callable(previous) and previous is not _ask and not by_user:
        previous(_asked[0], None)


def _ask(number, frame) -> None:
    if _asked:  # the second signal: no more waiting
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        return
    _asked.append(number)
    asked_by = "Ctrl-C" if number == signal.SIGINT else f"received {signal.Signals(number).name}"
    print(f"{asked_by}: stopping after the current step with a checkpoint (a second one stops at once)", flush=True)


def asked() -> bool:
    """Whether any process of the launch has been asked to stop (collective when launched:
    call it at the same point on every process)."""
    from rlhf import distributed

    if not distributed.launched():
        return bool(_asked)
    import torch

    return bool(distributed.all_sum(torch.tensor([float(bool(_asked))])).item() > 0)
