"""Figures: each writes a real PNG that matplotlib reads back; PCA helper."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from fcl_lightning.figures import (
    curves_figure,
    label_overlay,
    pca_2d,
    save_curves_figure,
    save_dice_vs_n_figure,
    save_embedding_figure,
    save_example_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 0 and pixels.shape[1] > 0 and pixels.shape[2] in (3, 4)
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def synthetic_slice(seed: int, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A noisy disc image and its label map (LV disc, Myo ring, RV crescent)."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    label = np.zeros((size, size), dtype=np.uint8)
    label[(r > 8) & (r < 12)] = 2
    label[r <= 8] = 3
    label[(np.hypot(yy - size / 2, xx - size / 2 + 14) < 7) & (label == 0)] = 1
    image = label.astype(np.float32) + np.random.default_rng(seed).normal(0, 0.3, (size, size))
    return image, label


def test_example_figure(tmp_path: Path) -> None:
    images, gts = zip(*(synthetic_slice(s) for s in range(3)))
    preds = [np.roll(g, 2, axis=1) for g in gts]
    path = save_example_figure(
        tmp_path / "figs" / "examples.png",
        list(images),
        {"ground truth": list(gts), "FCL": preds, "random init": [np.zeros_like(g) for g in gts]},
        title="test examples",
    )
    assert path == tmp_path / "figs" / "examples.png"
    check_png(path)


def test_example_figure_rejects_mismatched_columns(tmp_path: Path) -> None:
    image, label = synthetic_slice(0)
    with pytest.raises(ValueError, match="FCL"):
        save_example_figure(tmp_path / "x.png", [image, image], {"FCL": [label]})


def test_label_overlay_background_transparent() -> None:
    rgba = label_overlay(np.array([[0, 1], [2, 3]]))
    assert rgba.shape == (2, 2, 4)
    assert rgba[0, 0, 3] == 0.0
    assert all(rgba[i, j, 3] > 0 for i, j in [(0, 1), (1, 0), (1, 1)])
    assert len({tuple(rgba[i, j, :3]) for i, j in [(0, 1), (1, 0), (1, 1)]}) == 3


def test_embedding_figure(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    partitions = np.repeat(np.arange(4), 25)
    features = rng.normal(size=(100, 16)) + 3.0 * partitions[:, None] * rng.normal(size=(1, 16))
    path = save_embedding_figure(tmp_path / "emb.png", features, partitions, title="embeddings")
    check_png(path)


def test_pca_2d_finds_main_directions() -> None:
    rng = np.random.default_rng(1)
    t = rng.normal(size=(200, 2)) * np.array([10.0, 1.0])
    axes = np.linalg.qr(rng.normal(size=(5, 5)))[0][:, :2]  # orthonormal directions in R^5
    x = t @ axes.T + 7.0  # offset: PCA must centre
    points, ratio = pca_2d(x)
    assert points.shape == (200, 2)
    assert ratio[0] > 0.95 and ratio.sum() == pytest.approx(1.0)
    assert abs(np.corrcoef(points[:, 0], t[:, 0])[0, 1]) > 0.999
    one_dim, r1 = pca_2d(np.arange(6.0)[:, None])
    assert one_dim.shape == (6, 2) and np.all(one_dim[:, 1] == 0) and r1[0] == pytest.approx(1.0)


def test_dice_vs_n_figure(tmp_path: Path) -> None:
    table = {
        "random init": {1: (0.42, 0.05), 2: (0.55, 0.04), 6: (0.78, 0.02)},
        "FCL": {1: (0.61, 0.04), 2: (0.70, 0.03), 6: (0.84, 0.01)},
    }
    path = save_dice_vs_n_figure(tmp_path / "dice_vs_n.png", table)
    check_png(path)


@pytest.mark.parametrize("n", [3, 11])
def test_curves_get_distinct_colours_and_a_legend_that_hides_none(tmp_path, n):
    """A table's curves (11 on the plateau page): no two share a colour, and past a handful the
    legend sits beside the axes instead of over the lines."""
    curves = {f"arm {i}, N=1": ([250, 500, 750], [0.4 + 0.01 * i, 0.5, 0.6]) for i in range(n)}
    fig = curves_figure(curves)
    ax = fig.axes[0]
    colours = [line.get_color() for line in ax.get_lines()]
    assert len(colours) == n and len(set(colours)) == n
    renderer = FigureCanvasAgg(fig).get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    inside = ax.get_window_extent(renderer)
    assert (legend.x0 >= inside.x1) == (n > 6)
    check_png(save_curves_figure(tmp_path / "curves.png", curves))
