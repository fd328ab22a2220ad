"""Volumetric evaluation: Dice/HD95 against hand-computed values, conventions, prediction, rows, CSV."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

from fcl_lightning.data.volume import Volume, VolumeRecord
from fcl_lightning.evaluation import (
    ID_KEYS,
    METRIC_KEYS,
    STRUCTURES,
    evaluate_volumes,
    predict_volume,
    summarize,
    volume_metrics,
    write_rows_csv,
)

RV, MYO, LV = 1, 2, 3


def cube(shape: tuple[int, int, int], start: tuple[int, int, int], side: int, value: int) -> torch.Tensor:
    """uint8 label map ``[1, H, W, D]`` holding one ``side``-voxel cube of ``value`` at ``start``."""
    x = torch.zeros((1, *shape), dtype=torch.uint8)
    h, w, d = start
    x[0, h : h + side, w : w + side, d : d + side] = value
    return x


def nearest_label_net() -> nn.Module:
    """1x1 conv whose argmax is the label nearest the pixel value: logit_c = c*x - c^2/2."""
    net = nn.Conv2d(1, 4, kernel_size=1)
    with torch.no_grad():
        c = torch.arange(4, dtype=torch.float32)
        net.weight.copy_(c.view(4, 1, 1, 1))
        net.bias.copy_(-(c**2) / 2)
    return net


# --------------------------------------------------------------------------- metrics, by hand
#
# Two 4x4x4 cubes, the prediction shifted by k voxels along one axis.
# Dice: overlap 4*4*(4-k) voxels, sizes 64 + 64 -> 2*16*(4-k)/128 = (4-k)/4.
# HD95: the predicted surface is the true surface translated by k voxels, so every surface voxel
# is within k*s of the other surface (s = spacing along the shift axis); the 16 voxels of the
# leading face (16 of the 56 surface voxels = 29% > 5%) are exactly k*s away, as every voxel of
# the other cube lies >= k slices behind them. So the 95th percentile (and the max) is k*s mm.


def test_shift_along_slice_axis_anisotropic() -> None:
    gt = cube((12, 12, 12), (3, 3, 2), 4, LV)
    pred = cube((12, 12, 12), (3, 3, 4), 4, LV)  # k = 2 along D
    m = volume_metrics(pred, gt, (1.0, 1.0, 5.0))
    assert m["dice_lv"] == pytest.approx(0.5)
    assert m["hd95_lv"] == pytest.approx(10.0)  # 2 slices * 5 mm


def test_spacing_matters_only_along_the_shift_axis() -> None:
    gt = cube((12, 12, 12), (3, 3, 2), 4, LV)
    pred = cube((12, 12, 12), (3, 3, 4), 4, LV)
    assert volume_metrics(pred, gt, (1.0, 1.0, 1.0))["hd95_lv"] == pytest.approx(2.0)
    assert volume_metrics(pred, gt, (5.0, 5.0, 1.0))["hd95_lv"] == pytest.approx(2.0)
    assert volume_metrics(pred, gt, (1.0, 1.0, 2.5))["hd95_lv"] == pytest.approx(5.0)
    # Dice does not depend on spacing
    assert volume_metrics(pred, gt, (5.0, 5.0, 1.0))["dice_lv"] == pytest.approx(0.5)


def test_shift_in_plane_one_voxel() -> None:
    gt = cube((10, 10, 8), (2, 3, 2), 4, MYO)
    pred = cube((10, 10, 8), (3, 3, 2), 4, MYO)  # k = 1 along H
    m = volume_metrics(pred, gt, (1.5, 0.7, 8.0))
    assert m["dice_myo"] == pytest.approx(0.75)
    assert m["hd95_myo"] == pytest.approx(1.5)


def test_hd95_ignores_a_small_outlier() -> None:
    """One stray voxel 10 voxels away: Hausdorff (max) would be >= 10 mm, HD95 stays 0.

    Pred surface = 56 cube voxels (distance 0) + 1 outlier; the 95th percentile of those 57
    distances is 0. Dice = 2*64 / (65 + 64) = 128/129.
    """
    gt = cube((16, 12, 12), (2, 3, 3), 4, RV)
    pred = gt.clone()
    pred[0, 15, 4, 4] = RV
    m = volume_metrics(pred, gt, (1.0, 1.0, 1.0))
    assert m["hd95_rv"] == pytest.approx(0.0)
    assert m["dice_rv"] == pytest.approx(128 / 129)


def test_structures_scored_separately_and_keys() -> None:
    shape = (24, 12, 12)
    gt = cube(shape, (1, 1, 1), 4, RV) + cube(shape, (8, 1, 1), 4, MYO) + cube(shape, (16, 1, 1), 4, LV)
    pred = (
        cube(shape, (1, 1, 1), 4, RV)  # perfect
        + cube(shape, (8, 1, 2), 4, MYO)  # k = 1 along D
        + cube(shape, (16, 1, 3), 4, LV)  # k = 2 along D
    )
    m = volume_metrics(pred, gt, (1.0, 1.0, 3.0))
    assert tuple(m) == METRIC_KEYS
    assert [m[f"dice_{s}"] for s in STRUCTURES] == pytest.approx([1.0, 0.75, 0.5])
    assert [m[f"hd95_{s}"] for s in STRUCTURES] == pytest.approx([0.0, 3.0, 6.0])
    assert m["dice_mean"] == pytest.approx(0.75)
    assert m["hd95_mean"] == pytest.approx(3.0)
    assert all(isinstance(v, float) for v in m.values())


def test_accepts_maps_without_channel_axis() -> None:
    gt = cube((12, 12, 12), (3, 3, 2), 4, LV)
    pred = cube((12, 12, 12), (3, 3, 4), 4, LV)
    assert volume_metrics(pred[0], gt[0], (1.0, 1.0, 5.0)) == volume_metrics(pred, gt, (1.0, 1.0, 5.0))


def test_bad_inputs_raise() -> None:
    gt = cube((8, 8, 8), (2, 2, 2), 3, LV)
    with pytest.raises(ValueError, match="shapes differ"):
        volume_metrics(gt[:, :7], gt, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="values"):
        volume_metrics(gt * 2, gt, (1.0, 1.0, 1.0))


# --------------------------------------------------------------------------- empty structures


def test_empty_structure_conventions() -> None:
    shape = (12, 12, 12)
    gt = cube(shape, (3, 3, 2), 4, LV) + cube(shape, (0, 0, 0), 2, RV)  # RV in gt only
    pred = cube(shape, (3, 3, 4), 4, LV)  # no RV predicted; Myo in neither
    m = volume_metrics(pred, gt, (1.0, 1.0, 5.0))
    assert m["dice_myo"] == 1.0 and m["hd95_myo"] == 0.0  # absent in both
    assert m["dice_rv"] == 0.0 and math.isnan(m["hd95_rv"])  # in ground truth only
    assert m["dice_mean"] == pytest.approx((0.0 + 1.0 + 0.5) / 3)
    assert m["hd95_mean"] == pytest.approx((0.0 + 10.0) / 2)  # nan left out

    m2 = volume_metrics(gt, pred, (1.0, 1.0, 5.0))  # RV in prediction only
    assert m2["dice_rv"] == 0.0 and math.isnan(m2["hd95_rv"])


def test_all_empty_and_all_missing() -> None:
    empty = torch.zeros((1, 6, 6, 4), dtype=torch.uint8)
    m = volume_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert [m[k] for k in METRIC_KEYS] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]

    full = torch.zeros_like(empty)
    full[0, :2], full[0, 2:4], full[0, 4:] = RV, MYO, LV
    m = volume_metrics(empty, full, (1.0, 1.0, 1.0))  # nothing predicted
    assert m["dice_mean"] == 0.0
    assert all(math.isnan(m[f"hd95_{s}"]) for s in STRUCTURES)
    assert math.isnan(m["hd95_mean"])


# --------------------------------------------------------------------------- predict_volume


class Recorder(nn.Module):
    """Wraps a net; records each input shape and whether it ran in training mode."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.shapes: list[tuple[int, ...]] = []
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        self.modes.append(self.training)
        return self.net(x)


def test_predict_volume_shape_dtype_values() -> None:
    label = torch.randint(0, 4, (1, 5, 7, 3), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    pred = predict_volume(nearest_label_net(), label.float(), batch_size=2)
    assert pred.shape == (1, 5, 7, 3)
    assert pred.dtype == torch.uint8
    assert torch.equal(pred, label)


def test_predict_volume_is_per_slice_argmax_in_chunks() -> None:
    torch.manual_seed(0)
    net = Recorder(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)))
    net.train()
    image = torch.randn(1, 6, 9, 5)
    pred = predict_volume(net, image, batch_size=2)
    assert net.shapes == [(2, 1, 6, 9), (2, 1, 6, 9), (1, 1, 6, 9)]
    assert net.modes == [False, False, False]  # eval mode while predicting ...
    assert net.training  # ... and the caller's mode restored
    with torch.no_grad():
        for d in range(5):
            expected = net(image[..., d].unsqueeze(0)).argmax(dim=1)[0]  # [6, 9]
            assert torch.equal(pred[0, ..., d].long(), expected)

    # changing one slice changes the prediction of that slice only
    image2 = image.clone()
    image2[..., 3] = torch.randn(1, 6, 9)
    pred2 = predict_volume(net, image2, batch_size=4)
    keep = [0, 1, 2, 4]
    assert torch.equal(pred2[..., keep], pred[..., keep])
    assert not torch.equal(pred2[..., 3], pred[..., 3])


def test_predict_volume_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"\[1, H, W, D\]"):
        predict_volume(nearest_label_net(), torch.zeros(5, 7, 3))


# --------------------------------------------------------------------------- rows, summary, CSV


def make_volume(key: str, image_label: torch.Tensor, label: torch.Tensor, spacing: tuple) -> Volume:
    rec = VolumeRecord(key=key, patient=key.split("_")[0], frame=key.split("_")[1], group="NOR", site=1)
    return Volume(record=rec, image=image_label.float(), label=label, spacing=spacing)


def two_volumes() -> list[Volume]:
    gt = cube((12, 12, 12), (3, 3, 2), 4, LV)
    shifted = cube((12, 12, 12), (3, 3, 4), 4, LV)
    return [
        make_volume("patient001_ED", gt, gt, (1.0, 1.0, 5.0)),  # image = labels: perfect prediction
        make_volume("patient002_ES", shifted, gt, (1.0, 1.0, 5.0)),  # predicts the shifted cube
    ]


def test_evaluate_volumes_rows() -> None:
    rows = evaluate_volumes(nearest_label_net(), two_volumes(), batch_size=5)
    assert len(rows) == 2
    volumes = tuple(f"{s}_ml_{side}" for side in ("pred", "true") for s in ("RV", "MYO", "LV"))
    for row in rows:
        assert tuple(row) == ID_KEYS + METRIC_KEYS + volumes
    # LV of volume 0 is the cube the image is, predicted exactly: its volume in ml from the spacing
    assert rows[0]["LV_ml_pred"] == rows[0]["LV_ml_true"] > 0
    assert rows[0]["key"] == "patient001_ED" and rows[0]["patient"] == "patient001"
    assert rows[1]["frame"] == "ES" and rows[1]["group"] == "NOR" and rows[1]["site"] == 1
    assert rows[0]["dice_lv"] == 1.0 and rows[0]["hd95_lv"] == 0.0
    assert rows[1]["dice_lv"] == pytest.approx(0.5) and rows[1]["hd95_lv"] == pytest.approx(10.0)


def test_evaluate_volumes_needs_labels() -> None:
    vol = two_volumes()[0]
    vol.label = None
    with pytest.raises(ValueError, match="patient001_ED"):
        evaluate_volumes(nearest_label_net(), [vol])


def test_summarize_nan_aware() -> None:
    base = dict.fromkeys(METRIC_KEYS, 0.0)
    rows = [
        {**base, "dice_lv": 1.0, "hd95_rv": math.nan, "hd95_lv": 2.0, "hd95_mean": math.nan},
        {**base, "dice_lv": 0.5, "hd95_rv": math.nan, "hd95_lv": math.nan, "hd95_mean": 4.0},
    ]
    s = summarize(rows)
    assert tuple(s) == METRIC_KEYS
    assert s["dice_lv"] == pytest.approx(0.75)
    assert s["hd95_lv"] == pytest.approx(2.0)
    assert s["hd95_mean"] == pytest.approx(4.0)
    assert math.isnan(s["hd95_rv"])  # nan in every row
    assert all(math.isnan(v) for v in summarize([]).values())


def test_write_rows_csv(tmp_path) -> None:
    rows = evaluate_volumes(nearest_label_net(), two_volumes())
    rows[1]["group"] = None
    path = write_rows_csv(rows, tmp_path / "out" / "per_patient.csv")
    assert path == tmp_path / "out" / "per_patient.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        read = list(reader)
        assert tuple(reader.fieldnames)[: len(ID_KEYS + METRIC_KEYS)] == ID_KEYS + METRIC_KEYS
    assert [r["key"] for r in read] == ["patient001_ED", "patient002_ES"]
    assert float(read[1]["hd95_lv"]) == pytest.approx(10.0)
    assert float(read[0]["hd95_rv"]) == 0.0  # RV absent in both
    assert read[1]["group"] == ""
    assert sorted(p.name for p in path.parent.iterdir()) == ["per_patient.csv"]  # no temp file left

    write_rows_csv(rows[:1], path)  # overwrite in place
    with open(path, newline="") as f:
        assert len(list(csv.DictReader(f))) == 1
