"""Patient-level splits: id selections, federated client partitions, train/validation splits.

Every split works on patient ids, so the volumes (ED/ES frames) of one patient always stay together.
"""

from __future__ import annotations

import re

import numpy as np

from fcl_lightning.data.volume import DataError, VolumeRecord

SPLIT_MODES = ("iid", "group", "site")

_RANGE = re.compile(r"^(\d+)(?:\s*-\s*(\d+))?$")


def parse_id_range(spec: str | int) -> list[int]:
    """Parse an id selection such as ``"1-100"``, ``"1-20,41-60"`` or ``"5"`` into sorted unique ids.

    Ranges are inclusive; ids must be positive. Anything else raises :class:`DataError`.
    """
    text = str(spec).strip() if isinstance(spec, (str, int)) and not isinstance(spec, bool) else ""
    if not text:
        raise DataError(f"bad id selection {spec!r}: expected e.g. '1-100', '1-20,41-60' or '5'")
    ids: set[int] = set()
    for part in text.split(","):
        m = _RANGE.match(part.strip())
        if m is None:
            raise DataError(f"bad id selection {spec!r}: cannot parse {part.strip()!r} (expected N or N-M)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo < 1 or hi < lo:
            raise DataError(f"bad id selection {spec!r}: range {part.strip()!r} is empty or starts below 1")
        ids.update(range(lo, hi + 1))
    return sorted(ids)


def _patients(records: list[VolumeRecord]) -> dict[str, VolumeRecord]:
    """First record of each patient, in order of first appearance."""
    first: dict[str, VolumeRecord] = {}
    for r in records:
        first.setdefault(r.patient, r)
    return first


def _check_nonempty(clients: list[list[str]], num_patients: int, mode: str) -> list[list[str]]:
    for i, c in enumerate(clients):
        if not c:
            raise DataError(
                f"client {i} gets no patients ({num_patients} patients over {len(clients)} clients, mode={mode!r})"
            )
    return clients


def federated_split(records: list[VolumeRecord], num_clients: int, mode: str = "iid", seed: int = 0) -> list[list[str]]:
    """Assign patients to ``num_clients`` clients; returns each client's sorted patient ids.

    Modes:
        ``"iid"``: shuffle patients (by ``seed``) and cut into equal contiguous chunks (sizes differ by <= 1).
        ``"group"``: non-IID by diagnostic group: patients sorted by group (shuffled within a group) and cut
            into equal chunks, so each client holds one or few groups (ACDC 5 x 20, 10 clients -> 2 per group).
        ``"site"``: client = ``record.site``; every patient needs a site in ``[0, num_clients)``.

    Raises :class:`DataError` when a client would get no patient or a needed group/site is missing.
    """
    if mode not in SPLIT_MODES:
        raise ValueError(f"unknown split mode {mode!r}; expected one of {SPLIT_MODES}")
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    first = _patients(records)
    patients = list(first)
    if not patients:
        raise DataError("federated_split: no records to split")
    for r in records:  # a patient's frames must agree on what the split looks at
        f = first[r.patient]
        if (mode == "group" and r.group != f.group) or (mode == "site" and r.site != f.site):
            raise DataError(f"patient {r.patient}: volumes {f.key} and {r.key} disagree on {mode}")
    rng = np.random.default_rng(seed)

    if mode == "site":
        missing = [p for p, r in first.items() if r.site is None]
        if missing:
            raise DataError(f"patient {missing[0]} has no site; mode='site' needs one for every record")
        sites = sorted({r.site for r in first.values()})
        if sites[-1] >= num_clients or len(sites) < num_clients:
            raise DataError(
                f"the data holds {len(sites)} site(s) (ids {', '.join(map(str, sites[:10]))}) but data.num_clients is "
                f"{num_clients}: with data.split site there is one client per site, ids 0..{num_clients - 1}; set "
                f"--data.num_clients={sites[-1] + 1}"
                + ("" if sites == list(range(len(sites))) else " (and give every id a site)")
            )
        clients: list[list[str]] = [[] for _ in range(num_clients)]
        for p, r in first.items():
            clients[r.site].append(p)
        return _check_nonempty([sorted(c) for c in clients], len(patients), mode)

    order = [patients[i] for i in rng.permutation(len(patients))]
    if mode == "group":
        missing = [p for p in patients if first[p].group is None]
        if missing:
            raise DataError(f"patient {missing[0]} has no group; mode='group' needs one for every record")
        order.sort(key=lambda p: str(first[p].group))  # stable: keeps the shuffled order within a group
    chunks = np.array_split(np.arange(len(order)), num_clients)
    clients = [sorted(order[i] for i in chunk) for chunk in chunks]
    return _check_nonempty(clients, len(patients), mode)


def train_val_split(patients: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split patients into (train, val), deterministic by ``seed``; both keep the input order.

    ``round(val_fraction * n)`` patients go to validation, at least one when ``val_fraction > 0`` and
    there are two or more patients, and never all: at least one training patient remains.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if len(set(patients)) != len(patients):
        raise DataError("train_val_split: duplicate patient ids")
    n = len(patients)
    if n == 0:
        raise DataError("train_val_split: no patients to split")
    n_val = int(round(val_fraction * n))
    if val_fraction > 0:
        n_val = max(n_val, 1)
    n_val = min(n_val, n - 1)
    val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [p for i, p in enumerate(patients) if i not in val_idx]
    val = [p for i, p in enumerate(patients) if i in val_idx]
    return train, val


def kfold_split(patients: list[str], num_folds: int, fold: int, seed: int) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` for fold ``fold`` of a seeded ``num_folds``-fold split of ``patients``
    (the paper's cross-validation inside each client); both keep the input order."""
    if num_folds < 2:
        raise ValueError(f"cv_folds must be >= 2, got {num_folds}")
    if not 0 <= fold < num_folds:
        raise ValueError(f"cv_fold must be in [0, {num_folds}), got {fold}")
    if len(patients) < num_folds:
        raise DataError(f"{len(patients)} patients cannot be split into {num_folds} folds")
    order = np.random.default_rng(seed).permutation(len(patients))
    held = set(np.array_split(order, num_folds)[fold].tolist())
    return [p for i, p in enumerate(patients) if i not in held], [p for i, p in enumerate(patients) if i in held]
