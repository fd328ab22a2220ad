"""Round checkpoints: atomic writes, ``weights_only`` loads, clear errors on bad files."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fcl_lightning.errors import UserError
from fcl_lightning.fcl.memory_bank import BankEntries
from fcl_lightning.io import safe_torch_load

log = logging.getLogger(__name__)

FORMAT = "fcl-lightning/federated-v1"
_UMASK = os.umask(0)  # read once, at import (os.umask sets as it reads; not thread-safe later)
os.umask(_UMASK)


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from; the message names the file and the problem."""


class WriteError(CheckpointError):
    """A file of the run could not be written (disk full, read-only folder, ...)."""


def write_failure(path: Path, exc: BaseException) -> WriteError:
    """``cannot write <path>: <reason>``, with the operating system's reason where there is one.
    ``torch.save`` reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc]
    ... unexpected pos``; the folder's free space tells that case apart."""
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    else:
        try:
            full = shutil.disk_usage(path.parent).free < 64 * 2**20
        except OSError:
            full = False
        reason = os.strerror(errno.ENOSPC) if full else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return WriteError(f"cannot write {path}: {reason}")


def _temp_in(path: Path) -> str:
    """A new private temp file beside ``path`` (``.<name>.<random>.tmp``; removed at the next
    start if a kill leaves it), with a plain file's mode."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private
    return tmp


def _atomic(path: str | Path, write: Callable[[str], Any]) -> Path:
    """``write`` a temp file beside ``path``, then rename it over ``path``: never a half-written
    file; a failure removes the temp file and names ``path`` (:func:`write_failure`)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_in(path)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, Exception):
            raise write_failure(path, exc) from exc
        raise
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically."""
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` to ``dst`` atomically (a plain copy, not a link: overwriting one of the two
    files later must never change the other)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


def atomic_link(target: str | Path, link: str | Path) -> Path:
    """Point ``link`` at ``target`` in the same folder: a relative symbolic link swapped in
    atomically (as Lightning's ``ModelCheckpoint(save_last="link")``), so the newest checkpoint is
    written once, not twice; a plain copy where the file system has no symbolic links."""
    target, link = Path(target), Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(target, link.parent), tmp)
    except (OSError, NotImplementedError):
        return atomic_copy(target, link)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return link


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` atomically (same mode as every file)."""
    return _atomic(path, lambda tmp: Path(tmp).write_text(text))


def check_writable(folder: str | Path) -> None:
    """Fail now, naming the folder, if the run could not write its outputs there: creates and
    removes a probe file in ``folder`` or its nearest existing parent (nothing is left behind)."""
    folder = Path(folder)
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        if not probe_dir.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(probe_dir))
        fd, tmp = tempfile.mkstemp(prefix=".fcl-write-check.", dir=probe_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise WriteError(f"cannot write to the output folder {folder} (trainer.default_root_dir): "
                         f"{exc.strerror or exc} at {probe_dir}") from None


#: temp files of the project's atomic writes: ``.<name>.<random>.tmp``, ``.<name>.<pid>[.link].tmp``
TEMP_GLOB = ".*.tmp"


def remove_interrupted_writes(root: str | Path) -> list[Path]:
    """Delete the temp files an interrupted (killed) write left in ``root`` and its
    ``checkpoints/`` folder; the files they were to replace are whole (writes are atomic)."""
    removed = []
    for d in (Path(root), Path(root) / "checkpoints"):
        if d.is_dir():
            for p in d.glob(TEMP_GLOB):
                if p.is_file() or p.is_symlink():
                    p.unlink(missing_ok=True)
                    removed.append(p)
    if removed:
        log.info("removed %d temp file(s) of interrupted writes in %s", len(removed), root)
    return removed


def update_summary(root: str | Path, values: dict[str, Any]) -> Path:
    """Merge ``values`` into ``<root>/summary.json`` (other stages' keys are kept)."""
    path = Path(root) / "summary.json"
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}
    data.update(values)
    return atomic_write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n", path)


def bank_to_dict(entries: BankEntries | None) -> dict[str, torch.Tensor] | None:
    return None if entries is None else {k: v.detach().cpu() for k, v in entries._asdict().items()}


def bank_from_dict(d: dict[str, torch.Tensor] | None) -> BankEntries | None:
    return None if d is None else BankEntries(d["vectors"], d["partitions"], d["clients"])


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
        if (isinstance(into, torch.Tensor) and into.device.type == "cpu" and into.shape == src.shape
                and into.dtype == src.dtype):
            return into.copy_(src)
        return src.to("cpu", copy=True)
    if isinstance(obj, dict):
        old = into if isinstance(into, dict) else {}
        return {k: snapshot(v, old.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        old = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(snapshot(v, o) for v, o in zip(obj, old))
    return obj


class BackgroundWriter:
    """Runs checkpoint writes on one background thread, at most one in flight, so that serialising
    and writing round r's checkpoint overlaps round r+1's training.

    ``submit`` waits for the previous write first; ``wait`` joins and re-raises a write's error;
    leaving a ``with`` block waits too (logging, not raising, a write's error when the block itself
    failed: that error is the one to report). The thread is not a daemon: an interrupted run still finishes the write it started, and every
    file is written atomically, so a checkpoint on disk is always whole.
    ``enabled=False`` writes in the caller's thread.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], Any]) -> None:
        self.wait()
        if not self.enabled:
            write()
            return

        def target() -> None:
            try:
                write()
            except BaseException as exc:  # handed to the main thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=target, name="fcl-checkpoint-writer")
        self._thread.start()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.wait()
            return
        try:
            self.wait()
        except CheckpointError as err:
            log.error("%s", err)

    def check(self) -> None:
        """Re-raise the error of a write that has already finished (does not wait for one in flight)."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, CheckpointError):
                raise err
            raise CheckpointError(f"writing a round checkpoint failed: {type(err).__name__}: {err}") from err


def rng_state() -> dict[str, Any]:
    """Global RNG states in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))


def resolve_ckpt_path(ckpt_path: str | None, root: str | Path) -> Path | None:
    """``None`` -> no resume; ``last`` -> ``<root>/checkpoints/last.ckpt``; else the path given."""
    if ckpt_path is None:
        return None
    path = Path(root) / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (ckpt_path={ckpt_path!r})")
    return path


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a federated round checkpoint with ``weights_only=True`` and check its format
    (``mmap``: tensors are read only when used)."""
    ckpt = safe_torch_load(path, "checkpoint", CheckpointError, mmap=mmap)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an fcl-lightning federated checkpoint (expected format {FORMAT!r})")
    return ckpt
