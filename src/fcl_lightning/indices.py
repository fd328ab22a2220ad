"""Cardiac indices of the ACDC challenge (its second table), computed from label maps.

ACDC labels: 0 background, 1 RV cavity, 2 myocardium (LV wall), 3 LV cavity. A voxel's volume
is the product of the header spacing in mm (mm^3; / 1000 gives ml). From one patient's end-diastole
(ED) and end-systole (ES) maps come the LV / RV volumes, ejection fractions and myocardial mass; the
challenge then compares predicted with true indices over patients by correlation, Bland-Altman
bias and limits of agreement, and mean absolute error (:func:`agreement`). :func:`implausible` names
the indices of a patient outside wide physiologically possible ranges (a likely segmentation failure).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcl_lightning.io import atomic_write_text

#: ACDC label value of each structure
STRUCTURE_LABELS: dict[str, int] = {"RV": 1, "MYO": 2, "LV": 3}
#: myocardial tissue density used by ACDC to turn myocardial volume into mass
MYO_DENSITY_G_PER_ML = 1.05
#: the indices :func:`cardiac_indices` returns, in this order
INDEX_NAMES = ("LV_EDV", "LV_ESV", "LV_EF", "RV_EDV", "RV_ESV", "RV_EF", "MYO_mass_g", "MYO_ES_mass_g")
#: Bland-Altman limits of agreement: bias -/+ this many standard deviations of the differences
LOA_Z = 1.96


#: Plausible range (low, high) of each index: deliberately WIDE "physiologically possible in an
#: adult heart" bounds, not normal ranges. See :func:`implausible`, whose docstring gives their source.
PLAUSIBLE_RANGES: dict[str, tuple[float, float]] = {
    "LV_EDV": (10.0, 600.0),
    "LV_ESV": (3.0, 550.0),
    "LV_EF": (5.0, 90.0),
    "RV_EDV": (10.0, 600.0),
    "RV_ESV": (3.0, 550.0),
    "RV_EF": (5.0, 90.0),
    "MYO_mass_g": (30.0, 400.0),
    "MYO_ES_mass_g": (30.0, 400.0),
}
#: hard bounds of an ejection fraction in percent: outside them the ESV / EDV relation is impossible
EF_HARD_RANGE = (0.0, 100.0)


def index_unit(name: str) -> str:
    """Unit of an index name: ``%`` for ejection fractions, ``g`` for masses, ``ml`` otherwise (volumes)."""
    if name.endswith("_EF") or name == "EF":
        return "%"
    if "mass" in name.lower():
        return "g"
    return "ml"


def voxel_volume_ml(spacing: Sequence[float]) -> float:
    """Volume in ml of one voxel of header spacing ``(x, y, z)`` in mm."""
    if len(spacing) != 3:
        raise ValueError(f"spacing must be 3 values (x, y, z) in mm, got {tuple(spacing)}")
    sx, sy, sz = (float(s) for s in spacing)
    if not all(math.isfinite(s) and s > 0 for s in (sx, sy, sz)):
        raise ValueError(f"spacing must be positive and finite, got {tuple(spacing)}")
    return sx * sy * sz / 1000.0


def structure_volumes_ml(label: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, float]:
    """Volume in ml of RV (label 1), MYO (2) and LV (3): voxel count x voxel volume.

    Returns ``{"RV": .., "MYO": .., "LV": ..}``.
    """
    label = np.asarray(label)
    vox = voxel_volume_ml(spacing)
    return {name: int(np.count_nonzero(label == value)) * vox for name, value in STRUCTURE_LABELS.items()}


def ejection_fraction(edv: float, esv: float) -> float:
    """Ejection fraction in percent, ``100 (EDV - ESV) / EDV``; NaN when EDV is 0 (no cavity at ED)."""
    return 100.0 * (edv - esv) / edv if edv != 0 else math.nan


def cardiac_indices(
    ed: np.ndarray,
    es: np.ndarray,
    spacing_ed: tuple[float, float, float],
    spacing_es: tuple[float, float, float] | None = None,
) -> dict[str, float]:
    """ACDC cardiac indices of one patient from its ED and ES label maps.

    Volumes in ml (``LV_EDV``, ``LV_ESV``, ``RV_EDV``, ``RV_ESV``), ejection fractions in percent
    (``LV_EF``, ``RV_EF``; NaN if the EDV is 0) and myocardial mass in g (volume x
    :data:`MYO_DENSITY_G_PER_ML`). ``MYO_mass_g`` is the mass at ED, the one the ACDC challenge
    reports; ``MYO_ES_mass_g`` (at ES) is given as well, since the myocardium should keep its mass
    over the cycle and the gap between the two is a consistency check of a segmentation.
    ``spacing_es`` defaults to ``spacing_ed`` (ACDC's two frames share one header spacing).
    """
    v_ed = structure_volumes_ml(ed, spacing_ed)
    v_es = structure_volumes_ml(es, spacing_ed if spacing_es is None else spacing_es)
    return indices_from_volumes(v_ed, v_es)


def indices_from_volumes(v_ed: dict[str, float], v_es: dict[str, float]) -> dict[str, float]:
    """The indices of :func:`cardiac_indices` from the ED and ES structure volumes (ml)."""
    return {
        "LV_EDV": v_ed["LV"],
        "LV_ESV": v_es["LV"],
        "LV_EF": ejection_fraction(v_ed["LV"], v_es["LV"]),
        "RV_EDV": v_ed["RV"],
        "RV_ESV": v_es["RV"],
        "RV_EF": ejection_fraction(v_ed["RV"], v_es["RV"]),
        "MYO_mass_g": v_ed["MYO"] * MYO_DENSITY_G_PER_ML,
        "MYO_ES_mass_g": v_es["MYO"] * MYO_DENSITY_G_PER_ML,
    }


def finite_pairs(
    pred: Sequence[float], true: Sequence[float], what: str = "pred and true"
) -> tuple[np.ndarray, np.ndarray]:
    """``pred`` and ``true`` as float64 arrays without the pairs where either is NaN."""
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    t = np.asarray(true, dtype=np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"{what} differ in length: {p.size} vs {t.size}")
    keep = ~(np.isnan(p) | np.isnan(t))
    return p[keep], t[keep]


def agreement(pred: Sequence[float], true: Sequence[float]) -> dict[str, float]:
    """Agreement of predicted with true values of one index over patients, as ACDC reports it.

    ``corr`` (Pearson), ``bias`` (mean of pred - true), ``loa_low`` / ``loa_high`` (Bland-Altman
    95% limits of agreement, bias -/+ 1.96 x SD of the differences, ddof=1), ``mae`` and ``n``
    (pairs used). Pairs where either value is NaN are dropped; with fewer than 2 pairs every
    statistic is NaN. ``corr`` is NaN when pred or true is constant (undefined, not a warning).
    """
    p, t = finite_pairs(pred, true)
    n = int(p.size)
    if n < 2:
        return {"corr": math.nan, "bias": math.nan, "loa_low": math.nan, "loa_high": math.nan, "mae": math.nan, "n": n}
    diff = p - t
    bias = float(diff.mean())
    sd = float(diff.std(ddof=1))
    if p.std() > 0 and t.std() > 0:
        corr = float(np.corrcoef(p, t)[0, 1])
    else:
        corr = math.nan
    return {
        "corr": corr,
        "bias": bias,
        "loa_low": bias - LOA_Z * sd,
        "loa_high": bias + LOA_Z * sd,
        "mae": float(np.abs(diff).mean()),
        "n": n,
    }


def indices_table(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Index name -> :func:`agreement` of its values, from rows ``{"patient", "index", "pred", "true"}``
    (one row per patient and index), in the order the indices first appear."""
    pairs: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        pred, true = pairs.setdefault(str(row["index"]), ([], []))
        pred.append(float(row["pred"]))
        true.append(float(row["true"]))
    return {name: agreement(pred, true) for name, (pred, true) in pairs.items()}


def write_indices_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write one row per patient (``patient`` first, then every index any row has) to the CSV ``path``.

    Floats are written with ``repr`` so they read back exactly; a missing index is an empty cell.
    The file is written atomically (:func:`fcl_lightning.io.atomic_write_text`).
    """
    fields = ["patient"]
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(float(v)) if isinstance(v, (float, np.floating)) else v for k, v in row.items()})
    return atomic_write_text(buf.getvalue(), path)


def patient_indices(
    rows: Sequence[dict[str, Any]], group: Sequence[str] = ("client", "patient")
) -> list[dict[str, Any]]:
    """Per patient with an ED and an ES row (scored volumes carrying ``<S>_ml_pred`` and
    ``<S>_ml_true`` for S in RV, MYO, LV): the ``group`` keys and ``<index>_pred`` / ``<index>_true``."""
    frames: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r.get("frame") in ("ED", "ES") and "LV_ml_pred" in r:
            frames.setdefault(tuple(r.get(k) for k in group), {})[r["frame"]] = r
    out = []
    for key, f in frames.items():
        if "ED" not in f or "ES" not in f:
            continue
        row: dict[str, Any] = dict(zip(group, key))
        for side in ("pred", "true"):
            vols = {fr: {s: float(f[fr][f"{s}_ml_{side}"]) for s in STRUCTURE_LABELS} for fr in ("ED", "ES")}
            row.update({f"{k}_{side}": v for k, v in indices_from_volumes(vols["ED"], vols["ES"]).items()})
        out.append(row)
    return out


def _number(value: Any) -> float | None:
    """``value`` as a float; ``None`` for a missing or empty cell (a CSV read back gives text)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return float(value)


def implausible(row: dict[str, Any]) -> list[str]:
    """Names of what is implausible in one patient's indices (``row`` holds :data:`INDEX_NAMES`;
    a missing or empty one is skipped); empty when every index is plausible.

    Each index outside its range of :data:`PLAUSIBLE_RANGES` gives ``<index><<low><unit>`` or
    ``<index>><high><unit>`` (e.g. ``RV_EDV<10ml``, ``MYO_mass_g>400g``), and each impossible relation
    its own name: ``<V>_EF<0%`` (ESV > EDV), ``<V>_EF>100%`` (a negative ESV) and ``<V>_EF=NaN``
    (EDV is 0: no cavity at end-diastole; any other NaN index gives ``<index>=NaN`` too). An EF
    outside the hard bounds is named by the relation only, not also by its plausible range.

    The ranges are deliberately wide, "physiologically possible in an adult heart", not normal values.
    They start from the normal adult values of Kawel-Boehm et al., "Reference ranges ('normal values')
    for cardiovascular magnetic resonance (CMR) in adults and children: 2020 update", J Cardiovasc
    Magn Reson 22:87 (2020) (roughly: LV EF 55-75 %, RV EF 45-75 %, ventricular EDV 90-250 ml, LV mass
    65-180 g, by sex and age in its tables), widened to cover the pathologies of the ACDC challenge
    (Bernard et al., IEEE TMI 37(11):2514-2525, 2018): dilated cardiomyopathy (LV EF down to ~10 %,
    LV EDV ~400-500 ml), hypertrophic cardiomyopathy (thick, heavy myocardium, high EF, small ESV),
    myocardial infarction (low EF) and abnormal RV (dilated RV, low RV EF). A flag thus means a
    likely segmentation failure, never a diagnosis:

    =================  =============  ==========================================
    index              plausible      note
    =================  =============  ==========================================
    LV_EDV, RV_EDV     10 - 600 ml    normal ~90-250 ml; DCM LV up to ~500 ml
    LV_ESV, RV_ESV     3 - 550 ml     HCM: small ESV; DCM: ESV near the EDV
    LV_EF, RV_EF       5 - 90 %       hard bounds 0 - 100 % (ESV <= EDV); DCM ~10 %
    MYO_mass_g         30 - 400 g     LV myocardium at ED; HCM heavy
    MYO_ES_mass_g      30 - 400 g     the same myocardium at ES
    =================  =============  ==========================================
    """
    flags: list[str] = []
    for name in INDEX_NAMES:
        value = _number(row.get(name))
        if value is None:
            continue
        unit = index_unit(name)
        if math.isnan(value):
            flags.append(f"{name}=NaN")
            continue
        low, high = PLAUSIBLE_RANGES[name]
        if unit == "%":
            hard_low, hard_high = EF_HARD_RANGE
            if value < hard_low:
                flags.append(f"{name}<{hard_low:g}%")
                continue
            if value > hard_high:
                flags.append(f"{name}>{hard_high:g}%")
                continue
        if value < low:
            flags.append(f"{name}<{low:g}{unit}")
        elif value > high:
            flags.append(f"{name}>{high:g}{unit}")
    return flags
