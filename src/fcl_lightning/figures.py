"""Figures for reports: example segmentations, embedding projections, Dice vs labelled patients,
Bland-Altman plots of cardiac indices.

Drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``, no ``pyplot``), so
nothing needs a display and the global backend of the caller is left alone. Every function writes a
PNG to a temporary file next to ``path`` and moves it into place with ``os.replace``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from fcl_lightning.indices import agreement, finite_pairs, index_unit
from fcl_lightning.io import atomic_write

#: Overlay colour (RGB) and legend name of each foreground label; background stays transparent.
LABEL_COLORS: dict[int, tuple[tuple[float, float, float], str]] = {
    1: ((0.90, 0.20, 0.20), "RV"),
    2: ((0.20, 0.80, 0.25), "Myo"),
    3: ((0.25, 0.45, 1.00), "LV"),
}
OVERLAY_ALPHA = 0.5


def _save(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Render ``fig`` to PNG at ``path`` atomically (:func:`fcl_lightning.io.atomic_write`)."""
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))


def label_overlay(label: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """RGBA ``[H, W, 4]`` overlay of a 2D label map: ``LABEL_COLORS``, background fully transparent."""
    label = np.asarray(label)
    rgba = np.zeros((*label.shape, 4), dtype=np.float32)
    for value, (rgb, _) in LABEL_COLORS.items():
        mask = label == value
        rgba[mask, :3] = rgb
        rgba[mask, 3] = alpha
    return rgba


def _display_range(image: np.ndarray) -> tuple[float, float]:
    """Robust grey-level window (1st-99th percentile) so a few bright voxels don't wash out the slice."""
    lo, hi = np.percentile(image, [1.0, 99.0]) if image.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = float(image.min(initial=0.0)), float(image.max(initial=1.0))
        hi = hi if hi > lo else lo + 1.0
    return float(lo), float(hi)


def save_example_figure(
    path: str | os.PathLike,
    images: Sequence[np.ndarray],
    columns: Mapping[str, Sequence[np.ndarray]],
    title: str = "",
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Grid of example slices: one row per slice, the image first, then one overlay column per entry.

    Args:
        path: PNG to write.
        images: 2D ``[H, W]`` image slices.
        columns: column title -> one 2D label map per image (e.g. ``"ground truth"``, ``"FCL"``),
            drawn as coloured overlays (RV / Myo / LV) on the image.
        title: figure title.
        row_labels: optional name of each row (e.g. the volume key and slice index).
    """
    images = [np.asarray(im, dtype=np.float32) for im in images]
    if not images:
        raise ValueError("save_example_figure needs at least one image")
    for name, maps in columns.items():
        if len(maps) != len(images):
            raise ValueError(f"column {name!r} has {len(maps)} label maps for {len(images)} images")
        for im, lab in zip(images, maps):
            if np.shape(lab) != im.shape:
                raise ValueError(f"column {name!r}: label map shape {np.shape(lab)} != image shape {im.shape}")
    if row_labels is not None and len(row_labels) != len(images):
        raise ValueError(f"{len(row_labels)} row labels for {len(images)} images")

    n_rows, n_cols = len(images), 1 + len(columns)
    h, w = images[0].shape
    cell = 2.4
    fig = Figure(figsize=(cell * n_cols * max(w / h, 0.5), cell * n_rows + 0.6))
    axes = np.asarray(fig.subplots(n_rows, n_cols, squeeze=False))
    col_titles = ["image", *columns.keys()]
    for r, image in enumerate(images):
        vmin, vmax = _display_range(image)
        maps = [None, *(columns[name][r] for name in columns)]
        for c, lab in enumerate(maps):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            if lab is not None:
                ax.imshow(label_overlay(lab), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_titles[c], fontsize=10)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=8)
    handles = [Patch(facecolor=rgb, alpha=0.8, label=name) for rgb, name in LABEL_COLORS.values()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, path)


def pca_2d(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project ``[N, d]`` features on their first two principal components (numpy SVD).

    Returns:
        ``(points [N, 2], explained_variance_ratio [2])``; missing components (``d < 2`` or
        ``N < 3``) are zero.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, d], got shape {x.shape}")
    x = x - x.mean(axis=0, keepdims=True)
    points = np.zeros((x.shape[0], 2))
    ratio = np.zeros(2)
    if x.size == 0:
        return points, ratio
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(2, vt.shape[0])
    points[:, :k] = x @ vt[:k].T
    total = float((s**2).sum())
    if total > 0:
        ratio[:k] = s[:k] ** 2 / total
    return points, ratio


def save_embedding_figure(
    path: str | os.PathLike, features: np.ndarray, partitions: np.ndarray, title: str = ""
) -> Path:
    """Scatter of the 2D PCA projection of ``[N, d]`` embeddings, coloured by partition index.

    Used to see whether the encoder groups slices by position (partition) in the volume.
    """
    features = np.asarray(features)
    partitions = np.asarray(partitions).reshape(-1)
    if features.ndim != 2 or features.shape[0] != partitions.shape[0]:
        raise ValueError(f"features [N, d] and partitions [N] disagree: {features.shape} vs {partitions.shape}")
    points, ratio = pca_2d(features)
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    values = np.unique(partitions)
    qualitative = len(values) <= 10
    cmap = matplotlib.colormaps["tab10" if qualitative else "viridis"]
    for i, value in enumerate(values):
        sel = partitions == value
        color = cmap(i) if qualitative else cmap(i / max(len(values) - 1, 1))
        ax.scatter(points[sel, 0], points[sel, 1], s=12, alpha=0.75, color=color, label=f"partition {value}")
    ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.1f}% var.)")
    ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.1f}% var.)")
    if len(values):
        ax.legend(fontsize=8, markerscale=1.5, loc="best", framealpha=0.8)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def save_dice_vs_n_figure(
    path: str | os.PathLike,
    table: Mapping[str, Mapping[int, tuple[float, float]]],
    title: str = "Dice vs labelled patients",
) -> Path:
    """Line plot with error bars: method -> {N labelled patients: (mean Dice, std)}."""
    fig = Figure(figsize=(6, 4.2))
    ax = fig.subplots()
    all_n: set[int] = set()
    for method, by_n in table.items():
        ns = sorted(by_n)
        all_n.update(ns)
        means = [by_n[n][0] for n in ns]
        stds = [by_n[n][1] for n in ns]
        ax.errorbar(ns, means, yerr=stds, marker="o", capsize=4, linewidth=1.5, label=method)
    if all_n:
        ax.set_xticks(sorted(all_n))
    ax.set_xlabel("labelled patients (N)")
    ax.set_ylabel("Dice")
    ax.grid(alpha=0.3)
    if table:
        ax.legend(fontsize=9)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def curves_figure(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "Held-out Dice against fine-tuning steps",
    xlabel: str = "fine-tuning steps per client",
) -> Figure:
    """Line plot: curve name -> (x values, Dice values), e.g. each arm's held-out Dice against
    its fine-tuning steps (where a curve flattens is where the arm has converged). Beyond a
    handful of curves the legend moves beside the axes (it would hide them) and the colours come
    from a 20-colour cycle (no two of up to 20 curves share one)."""
    many = len(curves) > 6
    fig = Figure(figsize=(9.6 if many else 6.4, 4.2))
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab20" if len(curves) > 10 else "tab10"].colors
    for i, (name, (xs, ys)) in enumerate(curves.items()):
        ax.plot(list(xs), list(ys), marker="o", linewidth=1.5, label=name, color=colours[i % len(colours)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Dice")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if many else {}))
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def save_curves_figure(
    path: str | os.PathLike, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], **labels: str
) -> Path:
    """:func:`curves_figure` (``labels``: its ``title`` and ``xlabel``), rendered to a PNG at ``path``."""
    return _save(curves_figure(curves, **labels), path)


def save_bland_altman_figure(
    path: str | os.PathLike,
    pairs: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "",
) -> Path:
    """Bland-Altman plots, one panel per index: index name -> ``(pred, true)`` over patients.

    x is the mean of pred and true, y is pred - true; lines mark the bias and the 95% limits of
    agreement (:func:`fcl_lightning.indices.agreement`, NaN pairs dropped). Each panel is titled
    with the index and its unit (ml for volumes, % for EF, g for mass).
    """
    if not pairs:
        raise ValueError("save_bland_altman_figure needs at least one index")
    n_cols = min(len(pairs), 4)
    n_rows = -(-len(pairs) // n_cols)
    fig = Figure(figsize=(3.6 * n_cols, 3.2 * n_rows + (0.4 if title else 0.0)))
    axes = np.asarray(fig.subplots(n_rows, n_cols, squeeze=False)).reshape(-1)
    for ax, (name, (pred, true)) in zip(axes, pairs.items()):
        p, t = finite_pairs(pred, true, f"index {name!r}: pred and true")
        stats = agreement(p, t)
        unit = index_unit(name)
        ax.scatter((p + t) / 2, p - t, s=14, alpha=0.75, color="tab:blue")
        if stats["n"] >= 2:
            ax.axhline(stats["bias"], color="tab:red", linewidth=1.2, label=f"bias {stats['bias']:.2f}")
            for key in ("loa_low", "loa_high"):
                ax.axhline(stats[key], color="tab:gray", linestyle="--", linewidth=1.0)
            ax.plot(
                [], [], color="tab:gray", linestyle="--", label=f"LoA [{stats['loa_low']:.2f}, {stats['loa_high']:.2f}]"
            )
            ax.legend(fontsize=7, loc="best", framealpha=0.8)
        ax.axhline(0.0, color="black", linewidth=0.6, alpha=0.5)
        ax.set_title(f"{name} ({unit})", fontsize=10)
        ax.set_xlabel(f"mean of pred and true ({unit})", fontsize=8)
        ax.set_ylabel(f"pred - true ({unit})", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(pairs) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def save_privacy_utility_figure(
    path: str | os.PathLike,
    arms: Sequence[str],
    dice: Mapping[int, Sequence[tuple[float, float]]],
    attacks: Sequence[Mapping | None],
    title: str = "Privacy and utility",
) -> Path:
    """Two panels over the same arms: held-out Dice (mean, std) at each N, and each attack's success
    as a multiple of its chance (``privacy_attacks.py``'s rows; ``None``: the arm sends no vectors)."""
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    x = np.arange(len(arms))
    width = 0.8 / max(1, len(dice))
    for i, (n, vals) in enumerate(sorted(dice.items())):
        means = [v[0] for v in vals]
        stds = [v[1] for v in vals]
        left.bar(x + (i - (len(dice) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=f"N={n}")
    left.set_ylabel("held-out Dice")
    attack_keys = (
        ("re-id top-1", "reid_top1", "reid_top1_chance"),
        ("re-id top-5", "reid_top5", "reid_top5_chance"),
        ("site", "site_acc", "site_chance"),
        ("membership AUC", "membership_auc", None),
    )
    width = 0.8 / len(attack_keys)
    for i, (name, key, chance) in enumerate(attack_keys):
        ratio = [
            math.nan if a is None else a[key] / (a[chance] if chance else 0.5)  # AUC: chance is 0.5
            for a in attacks
        ]
        right.bar(x + (i - (len(attack_keys) - 1) / 2) * width, ratio, width, label=name)
    right.axhline(1.0, color="k", linewidth=1, linestyle="--")
    right.set_ylabel("attack success / chance")
    for ax in (left, right):
        ax.set_xticks(x, arms, rotation=20, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
