"""One run per folder: ``fit`` holds ``<trainer.default_root_dir>/run.lock`` while it runs.

The lock is an exclusive ``flock`` on that file, which the kernel releases when the process ends
in any way (SIGKILL, a crash, a lost machine's reboot), so a killed run never leaves it stuck; the
file itself only says who holds it (pid, host, start time, command), for the message a second run
prints. Where ``flock`` is missing (Windows) the pid on the same host tells a stale lock instead.

Why not ``filelock``: until 3.29.7 its Unix lock opened the file with ``O_TRUNC`` before trying
``flock``, so a second run erased the holder text this message reads (tox-dev/filelock#591, fixed
by #594 in July 2026); it keeps the file after release on purpose (#577), where a run that failed
its checks here must leave its folder as it found it. It is not a declared dependency either
(torch brings it, at whatever version).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from fcl_lightning import layout
from fcl_lightning.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = layout.LOCK


class RunFolderBusy(UserError):
    """Another live run holds the folder's lock; the message names the folder and that run."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """``with RunLock(root):`` holds the folder's lock for the block; raises :class:`RunFolderBusy`
    at once when a live run holds it. The folders the lock had to create (the run folder and any
    missing parents, e.g. ``runs/``) that are still empty when it is released are removed again:
    a run that failed its checks leaves nothing."""

    def __init__(self, root: str | Path, option: str = "trainer.default_root_dir") -> None:
        self.root, self.option = Path(root), option
        self.path = self.root / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []  # deepest first

    def holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def busy(self, holder: dict[str, Any]) -> RunFolderBusy:
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
        if holder.get("started"):
            who += ", started " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["started"])))
        if holder.get("command"):
            who += f": {str(holder['command'])[:200]}"
        return RunFolderBusy(
            f"{self.root} ({self.option}) is in use by another run ({who}); wait for it to end "
            "or stop it, or choose another folder"
        )

    def acquire(self) -> None:
        missing = self.root
        while not missing.exists() and missing != missing.parent:
            self._created.append(missing)
            missing = missing.parent
        self.root.mkdir(parents=True, exist_ok=True)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": " ".join(["fcl-lightning", *sys.argv[1:]]),
        }
        if fcntl is None:  # pragma: no cover - Windows: pid on this host
            holder = self.holder() if self.path.exists() else {}
            if holder and (holder.get("host") != info["host"] or pid_alive(int(holder.get("pid", -1)))):
                raise self.busy(holder)
            self.path.write_text(json.dumps(info))
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self.busy(self.holder()) from None
            try:  # the file may have been released (unlinked) between open and flock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # before the unlock: a waiting run then locks a new file
            os.close(self._fd)
            self._fd = None
        elif fcntl is None:  # pragma: no cover
            self.path.unlink(missing_ok=True)
        for folder in self._created:
            try:
                folder.rmdir()  # only if empty
            except OSError:
                break
        self._created = []

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
