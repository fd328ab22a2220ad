"""Reading files the user hands over: one guarded ``torch.load``."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from fcl_lightning.errors import UserError


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
            raise error(f"{what} {path} is not a plain weights file: it holds Python objects that a safe "
                        "(weights_only) load refuses to run") from None
        raise error(f"{not_torch} (or it is damaged)") from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, IndexError, KeyError, ValueError, UnicodeDecodeError,
            AttributeError, TypeError) as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise error(f"{not_torch}, or it is truncated or damaged ({detail})") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
