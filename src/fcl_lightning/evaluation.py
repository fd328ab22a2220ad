"""Volumetric evaluation: slice-wise prediction of whole volumes, 3D Dice and HD95 per structure.

Metrics are computed with MONAI in 3D over the whole volume, HD95 in mm (the volume's spacing).
Empty-structure conventions (a structure may be missing, e.g. no RV on apical slices of a cropped
volume, or a model that predicts nothing):

* absent in both prediction and ground truth: Dice 1.0, HD95 0.0 (nothing to find, nothing found);
* present in only one of them: Dice 0.0, HD95 ``nan`` (the distance to an empty set is undefined);
  ``nan`` HD95 values are left out of ``hd95_mean`` and of :func:`summarize` (nan-aware means).

HD95 on CPU needs SciPy (MONAI uses ``scipy.ndimage.binary_erosion`` and ``scipy.spatial.KDTree``).
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import SliceInferer
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import eval_mode

from fcl_lightning.data.volume import NUM_CLASSES, Volume
from fcl_lightning.io import atomic_write

#: Evaluated structures, in label order: label ``i + 1`` is ``STRUCTURES[i]``.
STRUCTURES: tuple[str, ...] = ("rv", "myo", "lv")
STRUCTURE_LABELS: dict[str, int] = {name: i + 1 for i, name in enumerate(STRUCTURES)}
DICE_KEYS: tuple[str, ...] = tuple(f"dice_{s}" for s in STRUCTURES) + ("dice_mean",)
HD95_KEYS: tuple[str, ...] = tuple(f"hd95_{s}" for s in STRUCTURES) + ("hd95_mean",)
#: Metric keys of one row, in CSV column order.
METRIC_KEYS: tuple[str, ...] = DICE_KEYS + HD95_KEYS
#: Identity columns of one row (from the volume's record).
ID_KEYS: tuple[str, ...] = ("key", "patient", "frame", "group", "site")


def _net_device_dtype(net: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the net's first parameter (CPU/float32 if it has none)."""
    for p in net.parameters():
        return p.device, (p.dtype if p.is_floating_point() else torch.float32)
    return torch.device("cpu"), torch.float32


def _slicewise(net: torch.nn.Module, image: torch.Tensor, batch_size: int, head) -> torch.Tensor:
    """``head(logits)`` of every axial slice of ``image`` ``[1, H, W, D]``, in chunks of
    ``batch_size`` on the net's device, in eval mode under ``torch.no_grad`` (the net's mode is
    restored afterwards): ``[D, ..., H, W]`` on the CPU."""
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be [1, H, W, D], got shape {tuple(image.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, dtype = _net_device_dtype(net)
    # MONAI's SliceInferer: every slice whole (roi = the slice), batch_size slices at a time on the
    # net's device, the logits stitched on the CPU; bitwise what a loop over chunks of slices gives
    inferer = SliceInferer(
        roi_size=tuple(image.shape[1:3]), sw_batch_size=batch_size, spatial_dim=2, sw_device=device, device="cpu"
    )
    with eval_mode(net):  # MONAI's: eval and no_grad, the training flag restored after
        logits = inferer(image.unsqueeze(0).to(dtype=dtype), net)  # [1, C, H, W, D]
    return head(logits[0].permute(3, 0, 1, 2))  # [D, C, H, W]


def predict_volume(net: torch.nn.Module, image: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Segment a volume slice by slice with a 2D network (``[B, 1, H, W] -> [B, C, H, W]`` logits).

    Returns:
        uint8 label map ``[1, H, W, D]`` (argmax over classes), on ``image``'s device.
    """
    if image.ndim == 4 and image.shape[-1] == 0:
        return torch.zeros(image.shape, dtype=torch.uint8, device=image.device)
    out = _slicewise(net, image, batch_size, lambda z: z.argmax(dim=1).to(torch.uint8))  # [D, H, W]
    return out.permute(1, 2, 0).unsqueeze(0).to(image.device)


def predict_probabilities(net: torch.nn.Module, image: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Softmax class probabilities ``[C, H, W, D]`` (float32, CPU) of a volume ``[1, H, W, D]``."""
    out = _slicewise(net, image, batch_size, lambda z: torch.softmax(z.float(), dim=1))  # [D, C, H, W]
    return out.permute(1, 2, 3, 0).contiguous()


def _as_label_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """``[1, H, W, D]`` or ``[H, W, D]`` label map -> long ``[H, W, D]`` on CPU, values checked."""
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"{name} must be [1, H, W, D] or [H, W, D], got shape {tuple(x.shape)}")
    x = x.detach().cpu().long()
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= NUM_CLASSES):
        raise ValueError(f"{name} values must be in 0..{NUM_CLASSES - 1}, got {int(x.min())}..{int(x.max())}")
    return x


def volume_metrics(pred: torch.Tensor, label: torch.Tensor, spacing: tuple[float, float, float]) -> dict[str, float]:
    """3D Dice and HD95 (mm) of each structure between two label maps of one volume.

    Args:
        pred: predicted label map, ``[1, H, W, D]`` or ``[H, W, D]``, values 0..3.
        label: ground-truth label map, same shape.
        spacing: voxel size in mm along (H, W, D), as in :attr:`Volume.spacing`.

    Dice uses MONAI ``compute_dice`` with ``ignore_empty=False``, which already gives 1.0 when a
    structure is absent from both maps and 0.0 when it is in only one. HD95 uses MONAI
    ``compute_hausdorff_distance(percentile=95, spacing=spacing)`` (symmetric, surface voxels,
    Euclidean, in mm); MONAI returns ``nan`` for every empty case, so it is only called when the
    structure is in both maps, and the conventions are set here: 0.0 when absent from both,
    ``nan`` when in one only. ``dice_mean`` is the mean over structures; ``hd95_mean`` the nanmean
    (``nan`` only if no structure has a finite HD95).

    Returns:
        ``dice_rv, dice_myo, dice_lv, dice_mean, hd95_rv, hd95_myo, hd95_lv, hd95_mean``.
    """
    p = _as_label_map(pred, "pred")
    g = _as_label_map(label, "label")
    if p.shape != g.shape:
        raise ValueError(f"pred and label shapes differ: {tuple(p.shape)} vs {tuple(g.shape)}")
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 values (H, W, D), got {spacing!r}")
    spacing_f = [float(s) for s in spacing]

    def one_hot(x: torch.Tensor) -> torch.Tensor:  # [H, W, D] -> [1, C, H, W, D]
        return F.one_hot(x, NUM_CLASSES).permute(3, 0, 1, 2).unsqueeze(0).float()

    dice = compute_dice(one_hot(p), one_hot(g), include_background=False, ignore_empty=False)[0]

    out: dict[str, float] = {}
    hd: dict[str, float] = {}
    for i, name in enumerate(STRUCTURES):
        lab = STRUCTURE_LABELS[name]
        pm, gm = p == lab, g == lab
        in_pred, in_gt = bool(pm.any()), bool(gm.any())
        out[f"dice_{name}"] = float(dice[i])
        if not in_pred and not in_gt:
            hd[name] = 0.0
        elif in_pred != in_gt:
            hd[name] = math.nan
        else:
            with warnings.catch_warnings():  # MONAI deprecation noise from its own internals
                warnings.simplefilter("ignore", FutureWarning)
                value = compute_hausdorff_distance(
                    pm[None, None].float(),
                    gm[None, None].float(),
                    include_background=True,
                    percentile=95,
                    spacing=spacing_f,
                )
            hd[name] = float(value[0, 0])
    out["dice_mean"] = float(np.mean([out[f"dice_{s}"] for s in STRUCTURES]))
    for name in STRUCTURES:
        out[f"hd95_{name}"] = hd[name]
    out["hd95_mean"] = _nanmean([hd[s] for s in STRUCTURES])
    return {k: out[k] for k in METRIC_KEYS}


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the non-nan values; ``nan`` (without a warning) if there are none."""
    return mean_std(values)[0]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation (over the values, ddof 0) of the non-nan values; ``nan`` for
    both (without a warning) if there are none. The project's one "mean +- std over clients"."""
    finite = np.array([float(v) for v in values if not math.isnan(float(v))])
    return (float(finite.mean()), float(finite.std())) if finite.size else (math.nan, math.nan)


@dataclass(frozen=True)
class PairedGain:
    """A method's gain over a baseline: the mean paired difference, its 95% bootstrap interval,
    the number of pairs and how many of them favour the method."""

    mean: float
    low: float
    high: float
    pairs: int
    wins: int

    @property
    def shown(self) -> bool:
        """Whether the interval excludes 0 (a gain, or a loss, that the pairs show)."""
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        verdict = "" if self.shown else ", not shown"
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}], {self.wins}/{self.pairs} pairs{verdict}"


def paired_gain(method: Mapping, baseline: Mapping, resamples: int = 10_000, seed: int = 0) -> PairedGain | None:
    """The gain of ``method`` over ``baseline``, paired on their common keys (e.g. ``(client,
    seed)``): mean difference and scipy's bootstrap 95% interval (BCa; percentile where BCa is
    undefined, as for a single distinct difference). ``None`` when they share no key."""
    from scipy.stats import bootstrap

    keys = sorted(set(method) & set(baseline), key=str)
    d = np.array([float(method[k]) - float(baseline[k]) for k in keys])
    d = d[~np.isnan(d)]
    if d.size == 0:
        return None
    if d.size == 1 or np.all(d == d[0]):
        low = high = float(d.mean())
    else:
        res = None
        for how in ("BCa", "percentile"):
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = bootstrap((d,), np.mean, n_resamples=resamples, method=how, random_state=seed)
            if np.isfinite(res.confidence_interval.low) and np.isfinite(res.confidence_interval.high):
                break
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return PairedGain(float(d.mean()), low, high, int(d.size), int((d > 0).sum()))


def over_clients(
    per_client: Sequence[Mapping[str, float]], keys: Sequence[str], prefix: str, std: bool = True
) -> dict[str, float]:
    """``{prefix}/{key}`` (mean over clients) and ``{prefix}/{key}_std`` for every key."""
    out: dict[str, float] = {}
    for k in keys:
        out[f"{prefix}/{k}"], s = mean_std([p[k] for p in per_client])
        if std:
            out[f"{prefix}/{k}_std"] = s
    return out


def evaluate_volumes(net: torch.nn.Module, volumes: list[Volume], batch_size: int = 32) -> list[dict]:
    """Predict and score each labelled volume: one row per volume (``ID_KEYS`` + ``METRIC_KEYS``).

    Raises:
        ValueError: a volume has no label (its key is named).
    """
    rows: list[dict] = []
    for vol in volumes:
        if vol.label is None:
            raise ValueError(f"volume {vol.record.key!r} has no label; evaluation needs labelled volumes")
        pred = predict_volume(net, vol.image, batch_size=batch_size)
        rec = vol.record
        row: dict = {"key": rec.key, "patient": rec.patient, "frame": rec.frame, "group": rec.group, "site": rec.site}
        row.update(volume_metrics(pred, vol.label, vol.spacing))
        row.update(structure_volume_columns(pred.cpu().numpy(), vol.label.cpu().numpy(), vol.spacing))
        rows.append(row)
    return rows


def structure_volume_columns(pred, label, spacing: Sequence[float]) -> dict[str, float]:
    """``<S>_ml_pred`` and ``<S>_ml_true`` (S in RV, MYO, LV): what the cardiac indices are made of."""
    from fcl_lightning.indices import structure_volumes_ml

    sp = tuple(float(x) for x in spacing)
    p, t = structure_volumes_ml(np.asarray(pred), sp), structure_volumes_ml(np.asarray(label), sp)
    return {**{f"{k}_ml_pred": v for k, v in p.items()}, **{f"{k}_ml_true": v for k, v in t.items()}}


def summarize(rows: Sequence[Mapping]) -> dict[str, float]:
    """Mean of each metric over rows (nan-aware: ``nan`` HD95 values are skipped).

    A metric that is ``nan`` in every row (or an empty ``rows``) gives ``nan``.
    """
    return {k: _nanmean([float(r[k]) for r in rows if k in r]) for k in METRIC_KEYS}


def write_rows_csv(rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Write per-volume rows to a CSV (header + one line per row), atomically.

    Columns: ``ID_KEYS`` and ``METRIC_KEYS`` first, then any other keys in order of appearance.
    Written atomically (:func:`fcl_lightning.io.atomic_write`): a reader never sees a
    half-written CSV. ``None`` is written as an empty cell, ``nan`` as ``nan``.
    """
    fields = list(ID_KEYS + METRIC_KEYS)
    for r in rows:
        fields.extend(k for k in r if k not in fields)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            for r in rows:
                writer.writerow({k: ("" if v is None else v) for k, v in r.items()})

    return atomic_write(path, write)
