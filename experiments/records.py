"""A table's records: the files of each finished cell that its figures come from, kept in a
folder apart from the run folder so that they can be committed and outlive the machine.

A run folder (``runs/tables/<profile>``) holds checkpoints, caches and logs: too large for git,
and gone with the machine. A records folder mirrors its layout but keeps, per finished cell,

- fine-tuning: ``cell.json``, ``config.yaml``, ``summary.json``, ``test_per_patient.csv`` and
  every ``logs/version_*/metrics.csv`` (the test figures and the held-out curve);
- pre-training: ``config.yaml``, the ``metrics.csv`` logs (its monitors), its encoders
  (``encoder.pt``, ``encoder_init.pt``, ``encoders/``; a few MB at the CPU profiles' width) and
  ``record.json``, a hash of each encoder's weights;

and the folder's ``provenance.json``. Restored into an empty run folder, they are finished cells,
so a table filled on several machines (or sessions) is reported as one, and new cells fine-tune
from the recorded encoders. The encoders themselves are kept because another machine does not
rerun a pre-training bit for bit (the same fine-tuning cell, same code and seed, measured 0.441
and 0.433 held-out Dice after its first round on two 2-core machines): encoders from a rerun would
be another pre-training run, and the recorded cells could not be paired with cells from it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import provenance

from fcl_lightning.layout import CONFIG, ENCODER, ENCODERS, INIT_ENCODER, LOGS, SUMMARY

RECORD = "record.json"  # a pre-training's record: its encoders' weights_hash
FINETUNE_FILES = ("cell.json", CONFIG, SUMMARY, "test_per_patient.csv")


def encoders(cell: Path) -> list[Path]:
    """The encoders a finished pre-training wrote."""
    return [p for p in (cell / ENCODER, cell / INIT_ENCODER, *sorted((cell / ENCODERS).glob("*.pt"))) if p.is_file()]


def files(cell: Path, pretrain: bool) -> list[Path]:
    """The files of ``cell`` (a run folder's cell) that its record keeps, relative to it."""
    names = (CONFIG,) if pretrain else FINETUNE_FILES
    kept = [Path(n) for n in names if (cell / n).is_file()]
    kept += [p.relative_to(cell) for p in encoders(cell)] if pretrain else []
    return kept + sorted(p.relative_to(cell) for p in cell.glob(f"{LOGS}/version_*/metrics.csv"))


def weights_hash(path: Path) -> str:
    """SHA-256 of what a ``torch.save`` file holds (names, dtypes, shapes and values, in key order),
    not of its bytes: the zip's record names follow the temporary file it was written to."""
    import torch

    from fcl_lightning.io import safe_torch_load

    h = hashlib.sha256()

    def walk(obj, key: str) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                walk(obj[k], f"{key}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{key}/{i}")
        else:
            h.update(f"{key}={obj!r}".encode())

    walk(safe_torch_load(path, "an encoder"), "")
    return h.hexdigest()


def encoder_hashes(cell: Path) -> dict[str, str]:
    """``weights_hash`` of every encoder a finished pre-training wrote, by path relative to it."""
    return {str(p.relative_to(cell)): weights_hash(p) for p in encoders(cell)}


def recorded_hashes(record: Path) -> dict[str, str] | None:
    """The encoder hashes of a pre-training's record (``None`` when there is no record)."""
    f = record / RECORD
    if not f.is_file():
        return None
    try:
        return dict(json.loads(f.read_text())["sha256"])
    except (ValueError, KeyError, TypeError):
        raise SystemExit(
            f"{f}: not a pre-training record of run_tables.py; remove {record} to record it again"
        ) from None


def check_encoders(cell: Path, record: Path, method: str) -> None:
    """Refuse a pre-training whose encoders differ from its record's (one run here before the
    records were used, say, or a record edited by hand): the recorded fine-tuning cells came from
    the recorded encoders, and new cells from these could not be paired with them."""
    want = recorded_hashes(record)
    if want is None or not (cell / ENCODER).is_file():
        return
    have = encoder_hashes(cell)
    differ = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    if differ:
        raise SystemExit(
            f"pre-training {method} at {cell} wrote encoders that differ from its record {record / RECORD} "
            f"({', '.join(differ)}), so the recorded fine-tuning cells (from the recorded encoders) cannot be "
            f"paired with new ones from it. Remove {cell} to fine-tune from the recorded encoders, or give this "
            "run folder another --records folder"
        )


def _replace_dir(tmp: Path, dst: Path) -> None:
    """Put the folder ``tmp`` at ``dst``, replacing what was there; a reader never sees a half copy."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def _copy_kept(src: Path, dst: Path, pretrain: bool) -> Path:
    """The kept files of ``src`` copied into a fresh temporary folder beside ``dst``; its path."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for rel in files(src, pretrain):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, tmp / rel)
    return tmp


def save(cell: Path, record: Path, pretrain: bool) -> None:
    """Record a finished cell: copy its kept files (and, for a pre-training, its encoders' hashes)
    to ``record``, replacing an older record of it whole."""
    tmp = _copy_kept(cell, record, pretrain)
    if pretrain:
        (tmp / RECORD).write_text(json.dumps({"sha256": encoder_hashes(cell)}, indent=1))
    record.parent.mkdir(parents=True, exist_ok=True)
    _replace_dir(tmp, record)


def restore(record: Path, cell: Path, pretrain: bool) -> bool:
    """Copy a cell's record into the run folder where that cell has no folder yet (a run there,
    finished or not, is left as it is); ``True`` when it did."""
    if cell.exists() or not record.is_dir():
        return False
    tmp = _copy_kept(record, cell, pretrain)
    cell.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(cell)
    return True


def merge_provenance(*folders: Path) -> list[dict]:
    """The calls recorded in every folder's ``provenance.json``, each once, in date order."""
    calls: list[dict] = []
    for folder in folders:
        calls += [c for c in provenance.read(folder) if c not in calls]
    return sorted(calls, key=lambda c: c["date"])


def write_provenance(folder: Path, calls: list[dict]) -> None:
    from fcl_lightning.io import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps({"calls": calls}, indent=2), folder / provenance.FILE)
