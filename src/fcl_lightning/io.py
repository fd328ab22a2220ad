"""Files in and out: one guarded ``torch.load`` for what the user hands over, and one atomic
write (temp file beside the target, then ``os.replace``) for everything the project writes, so a
kill or a full disk never leaves a half-written file and every failure names the file."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import shutil
import threading
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.serialization import config as torch_serialization

from fcl_lightning.errors import UserError

log = logging.getLogger(__name__)

#: temp files of the atomic writes: ``.<name>.<pid>.<random>.tmp`` beside the file they replace
TEMP_GLOB = ".*.tmp"


class WriteError(UserError):
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


def temp_path(path: Path) -> Path:
    """A fresh name beside ``path`` that :data:`TEMP_GLOB` matches (nothing is created)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], Any], exclusive: bool = True) -> Path:
    """``write(tmp)`` fills a temp file beside ``path``, which then replaces ``path``; the parent
    folder is created. The temp file is created empty first (``open(.., "x")``, so it gets the
    umask's mode like any new file) unless ``exclusive`` is false (for a symbolic link, which
    ``write`` creates itself). A failure removes the temp file and raises :class:`WriteError`
    naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        if exclusive:
            open(tmp, "xb").close()
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception):
            raise write_failure(path, exc) from exc
        raise
    return path


#: torch's ``compute_crc32`` setting is process-wide: one write without it at a time, each restoring it
_NO_CRC32 = threading.Lock()


def atomic_save(obj: Any, path: str | Path, crc32: bool = True) -> Path:
    """``torch.save`` atomically. ``crc32=False`` writes the zip records without their CRC-32
    (``torch.utils.serialization.config.save.compute_crc32``): for the round checkpoints, whose
    hundreds of MB it writes in about two thirds of the time, at no loss, since ``torch.load`` never checks
    it (PyTorch builds miniz with ``MINIZ_DISABLE_ZIP_READER_CRC32_CHECKS``). Another thread's
    ``torch.save`` meanwhile leaves it out too, which is as harmless."""
    with contextlib.nullcontext() if crc32 else without_crc32():
        return atomic_write(path, lambda tmp: torch.save(obj, tmp))


@contextlib.contextmanager
def without_crc32() -> Iterator[None]:
    """``torch.save`` without CRC-32 inside, torch's setting restored after."""
    config = torch_serialization.save
    with _NO_CRC32:
        before, config.compute_crc32 = config.compute_crc32, False
        try:
            yield
        finally:
            config.compute_crc32 = before


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` to ``dst`` atomically (a plain copy, not a link: overwriting one of the two
    files later must never change the other)."""
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def atomic_link(target: str | Path, link: str | Path) -> Path:
    """Point ``link`` at ``target`` in the same folder: a relative symbolic link swapped in
    atomically (as Lightning's ``ModelCheckpoint(save_last="link")``), so the newest checkpoint is
    written once, not twice; a plain copy where the file system has no symbolic links."""
    target, link = Path(target), Path(link)
    rel = os.path.relpath(target, link.parent)
    try:
        return atomic_write(link, lambda tmp: os.symlink(rel, tmp), exclusive=False)
    except WriteError as exc:
        if isinstance(exc.__cause__, (OSError, NotImplementedError)) and link.parent.is_dir():
            return atomic_copy(target, link)  # no links here; a real write problem fails again, named
        raise


def check_writable(folder: str | Path, what: str = "the output folder", key: str = "trainer.default_root_dir") -> None:
    """Fail now, naming the folder, if a run could not write there: creates and removes a probe
    file in ``folder`` or its nearest existing parent (nothing is left behind)."""
    folder = Path(folder)
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        if not probe_dir.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(probe_dir))
        probe = temp_path(probe_dir / "fcl-write-check")
        open(probe, "xb").close()
        probe.unlink()
    except OSError as exc:
        raise WriteError(f"cannot write to {what} {folder} ({key}): {exc.strerror or exc} at {probe_dir}") from None


def remove_interrupted_writes(*folders: str | Path) -> list[Path]:
    """Delete the temp files interrupted (killed) writes left in ``folders``; the files they
    were to replace are whole (writes are atomic)."""
    removed = []
    for d in map(Path, folders):
        if d.is_dir():
            for p in d.glob(TEMP_GLOB):
                if p.is_file() or p.is_symlink():
                    p.unlink(missing_ok=True)
                    removed.append(p)
    if removed:
        log.info("removed %d temp file(s) of interrupted writes in %s", len(removed), ", ".join(map(str, folders)))
    return removed


def safe_torch_load(path: str | Path, what: str, error: type[UserError] = UserError, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; every failure is one ``error`` naming
    ``what`` and ``path``: missing, a folder, not a file ``torch.save`` wrote, or a pickle that
    holds more than tensors and plain containers (refused, never run). ``mmap``: map the file
    instead of reading it (to look at a few entries of a large checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path} does not exist")
    if not path.is_file():
        raise error(f"{what} {path} is not a file")
    not_torch = f"{what} {path} is not a file written by torch.save"
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):  # neither torch's zip nor a legacy pickle
        raise error(f"{not_torch} (or it is truncated)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise error(
                f"{what} {path} is not a plain weights file: it holds Python objects that a safe "
                "(weights_only) load refuses to run"
            ) from None
        raise error(f"{not_torch} (or it is damaged)") from None
    except (
        zipfile.BadZipFile,
        EOFError,
        RuntimeError,
        IndexError,
        KeyError,
        ValueError,
        UnicodeDecodeError,
        AttributeError,
        TypeError,
    ) as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise error(f"{not_torch}, or it is truncated or damaged ({detail})") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
