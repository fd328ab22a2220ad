"""Writing round checkpoints: CPU snapshots of what training goes on mutating, one background
writer, the summary file, and the error a bad checkpoint raises. What a checkpoint holds, and
reading it back, is :mod:`fcl_lightning.federation.state`'s."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fcl_lightning import layout
from fcl_lightning.errors import UserError
from fcl_lightning.io import atomic_write_text

log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from; the message names the file and the problem."""


def update_summary(root: str | Path, values: dict[str, Any]) -> Path:
    """Merge ``values`` into ``<root>/summary.json`` (other stages' keys are kept)."""
    path = Path(root) / layout.SUMMARY
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}
    data.update(values)
    return atomic_write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n", path)


def to_cpu(obj: Any) -> Any:
    """Move every tensor in a nested structure to the CPU (checkpoints are device-free)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def snapshot(obj: Any, into: Any = None) -> Any:
    """A CPU copy of every tensor in a nested structure (``to_cpu`` without sharing storage), so
    that training may go on mutating the originals (e.g. Adam's moments) while it is written.

    ``into``: an earlier snapshot of the same structure that is no longer needed; its tensors of
    matching shape and dtype are overwritten instead of allocating new ones (fresh memory costs
    page faults, about as much as the copy itself for hundreds of MB).
    """
    if isinstance(obj, torch.Tensor):
        src = obj.detach()
        if (
            isinstance(into, torch.Tensor)
            and into.device.type == "cpu"
            and into.shape == src.shape
            and into.dtype == src.dtype
        ):
            return into.copy_(src)
        return src.to("cpu", copy=True)
    if isinstance(obj, dict):
        old = into if isinstance(into, dict) else {}
        return {k: snapshot(v, old.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        old = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(snapshot(v, o) for v, o in zip(obj, old))
    return obj


#: niceness of the background writer's thread: training threads come first while the write
#: takes the CPU time they leave (on 2 busy cores a write at the default priority slowed the
#: steps it overlapped by about its own CPU time; at +10 by about half, spread over more steps)
WRITER_NICENESS = 10


def lower_priority(niceness: int = WRITER_NICENESS) -> None:
    """Lower the calling thread's CPU priority (Linux, where threads have their own; elsewhere
    nothing)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


class BackgroundWriter:
    """Runs checkpoint writes on one background thread, at most one in flight, so that serialising
    and writing round r's checkpoint overlaps round r+1's training.

    ``submit`` waits for the previous write first; ``wait`` joins and re-raises a write's error;
    what a write returns is handed to ``on_done`` in the thread that waits, so the writer thread
    never touches the caller's state;
    leaving a ``with`` block waits too (logging, not raising, a write's error when the block itself
    failed: that error is the one to report). The thread is not a daemon: an interrupted run still finishes the write it started, and every
    file is written atomically, so a checkpoint on disk is always whole.
    ``enabled=False`` writes in the caller's thread.
    """

    def __init__(self, enabled: bool = True, on_done: Callable[[Any], None] | None = None) -> None:
        self.enabled = enabled
        self.on_done = on_done
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._result: list[Any] = []  # a finished write's return value, not yet handed over

    def submit(self, write: Callable[[], Any]) -> None:
        self.wait()
        if not self.enabled:
            self._done(write())
            return

        def target() -> None:
            lower_priority()
            try:
                self._result.append(write())
            except BaseException as exc:  # handed to the main thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=target, name="fcl-checkpoint-writer")
        self._thread.start()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.wait()
            return
        try:
            self.wait()
        except UserError as err:
            log.error("%s", err)

    def check(self) -> None:
        """Hand over the result, or re-raise the error, of a write that has already finished (does
        not wait for one in flight)."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        while self._result:
            self._done(self._result.pop())
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, UserError):  # already names the file and the round
                raise err
            raise CheckpointError(f"writing a round checkpoint failed: {type(err).__name__}: {err}") from err

    def _done(self, result: Any) -> None:
        if self.on_done is not None:
            self.on_done(result)
