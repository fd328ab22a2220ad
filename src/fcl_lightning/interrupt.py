"""A clean stop on SIGTERM (cluster schedulers, ``docker stop``, preemption) and SIGINT (Ctrl-C).

The first signal abandons what the command is doing at once (the round in progress, in ``fit``):
the checkpoint of the last finished round is already on disk or being written, and a resume with
``--ckpt_path last`` redoes the abandoned round bitwise as after a kill. Finishing the round
instead could outlast a scheduler's grace period (``docker stop`` waits 10 s, SLURM 30 s) and
would gain nothing a resume does not redo. The command then prints where it stopped and exits
with ``128 + signal`` (130 for SIGINT, 143 for SIGTERM), as a shell reports a process the signal
killed, so a scheduler or a retry loop sees a failure, never a success. A second signal while
stopping ends the process at once (every file is written atomically: nothing half-written stays).

Lightning's own SIGTERM handling (a ``SIGTERMException``, a ``SystemExit`` with code 0) and its
KeyboardInterrupt handling (exit 1) never see these signals: :class:`RunInterrupted` is neither.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: the signals that stop a command cleanly
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(BaseException):
    """Raised in the main thread by the first stop signal; ``message`` is what the command prints
    (the round loop fills in where the run stopped)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = int(signum)
        self.message = f"interrupted by {self.signame}"

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, the first of ``signals`` raises :class:`RunInterrupted` in the main
    thread and a second one exits at once; the previous handlers come back afterwards. A signal
    the process was started to ignore (``nohup``, ``SIG_IGN``) stays ignored; off the main thread
    (where Python cannot set handlers) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def handler(signum: int, frame: object) -> None:
        nonlocal stopping
        if stopping:
            sys.stderr.write(f"{signal.Signals(signum).name} again: stopping now\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        stopping = True
        raise RunInterrupted(signum)

    previous = {}
    for s in signals:
        current = signal.getsignal(s)
        if current in (signal.SIG_IGN, None):
            continue
        previous[s] = current
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
