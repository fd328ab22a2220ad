"""ACDC cardiac indices: volumes, EF and mass against explicit voxel loops and hand-computed
cases; agreement statistics against numpy; the CSV and Bland-Altman figure writers."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from fcl_lightning.figures import save_bland_altman_figure
from fcl_lightning.indices import (
    INDEX_NAMES,
    MYO_DENSITY_G_PER_ML,
    PLAUSIBLE_RANGES,
    agreement,
    cardiac_indices,
    implausible,
    index_unit,
    indices_from_volumes,
    indices_table,
    structure_volumes_ml,
    write_indices_csv,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPACING_ED = (1.37, 1.37, 10.0)
SPACING_ES = (1.5625, 1.40625, 6.5)


def loop_volumes(label: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, float]:
    """Reference: visit every voxel, count each label, multiply by x*y*z mm^3 / 1000."""
    counts = {1: 0, 2: 0, 3: 0}
    for idx in np.ndindex(label.shape):
        value = int(label[idx])
        if value in counts:
            counts[value] += 1
    mm3 = spacing[0] * spacing[1] * spacing[2]
    return {"RV": counts[1] * mm3 / 1000, "MYO": counts[2] * mm3 / 1000, "LV": counts[3] * mm3 / 1000}


def random_label(seed: int, shape: tuple[int, ...] = (9, 11, 6)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, size=shape).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_volumes_match_voxel_loop(seed):
    label = random_label(seed)
    got = structure_volumes_ml(label, SPACING_ED)
    want = loop_volumes(label, SPACING_ED)
    assert set(got) == {"RV", "MYO", "LV"}
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6)
    assert got["LV"] > 0  # the random map does hold every label


@pytest.mark.parametrize("seed", [0, 3])
def test_indices_match_voxel_loop_with_different_spacings(seed):
    ed, es = random_label(seed), random_label(seed + 100, shape=(8, 12, 5))
    got = cardiac_indices(ed, es, SPACING_ED, SPACING_ES)
    v_ed, v_es = loop_volumes(ed, SPACING_ED), loop_volumes(es, SPACING_ES)
    want = {
        "LV_EDV": v_ed["LV"],
        "LV_ESV": v_es["LV"],
        "LV_EF": 100 * (v_ed["LV"] - v_es["LV"]) / v_ed["LV"],
        "RV_EDV": v_ed["RV"],
        "RV_ESV": v_es["RV"],
        "RV_EF": 100 * (v_ed["RV"] - v_es["RV"]) / v_ed["RV"],
        "MYO_mass_g": v_ed["MYO"] * 1.05,
        "MYO_ES_mass_g": v_es["MYO"] * 1.05,
    }
    assert set(got) == set(want) == set(INDEX_NAMES)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    # the ES spacing is really used: with the ED spacing the ES volume changes
    assert cardiac_indices(ed, es, SPACING_ED, SPACING_ED)["LV_ESV"] != pytest.approx(got["LV_ESV"])


def test_known_box_case():
    """LV box 10x10x4 voxels at ED, 6x5x4 at ES; spacing 1.25 x 1.25 x 8 mm = 12.5 mm^3 per voxel."""
    spacing = (1.25, 1.25, 8.0)
    ed = np.zeros((20, 20, 6), dtype=np.uint8)
    es = np.zeros_like(ed)
    ed[2:12, 2:12, 1:5] = 3  # 400 voxels = 5.0 ml
    es[2:8, 2:7, 1:5] = 3  # 120 voxels = 1.5 ml
    ed[14:18, 2:12, 1:5] = 2  # 160 voxels myocardium = 2.0 ml at ED
    es[14:18, 2:7, 1:5] = 2  # 80 voxels = 1.0 ml at ES
    ed[2:12, 14:19, 1:5] = 1  # RV 200 voxels = 2.5 ml at ED
    es[2:12, 14:16, 1:5] = 1  # 80 voxels = 1.0 ml at ES
    ind = cardiac_indices(ed, es, spacing, spacing)
    assert ind["LV_EDV"] == pytest.approx(5.0)
    assert ind["LV_ESV"] == pytest.approx(1.5)
    assert ind["LV_EF"] == pytest.approx(70.0)  # 100 * 3.5 / 5
    assert ind["RV_EF"] == pytest.approx(60.0)  # 100 * 1.5 / 2.5
    assert MYO_DENSITY_G_PER_ML == 1.05
    assert ind["MYO_mass_g"] == pytest.approx(2.1)  # ED myocardium 2.0 ml x 1.05
    assert ind["MYO_ES_mass_g"] == pytest.approx(1.05)
    assert cardiac_indices(ed, es, spacing) == ind  # ES spacing defaults to the ED one


def test_ef_nan_without_ed_cavity():
    empty = np.zeros((4, 4, 2), dtype=np.uint8)
    ind = cardiac_indices(empty, empty, SPACING_ED, SPACING_ES)
    assert math.isnan(ind["LV_EF"]) and math.isnan(ind["RV_EF"])
    assert ind["LV_EDV"] == 0.0 and ind["MYO_mass_g"] == 0.0


def test_bad_spacing_rejected():
    with pytest.raises(ValueError, match="spacing"):
        structure_volumes_ml(np.zeros((2, 2, 2)), (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        structure_volumes_ml(np.zeros((2, 2, 2)), (1.0, 0.0, 1.0))


def test_agreement_constant_offset():
    true = np.array([120.0, 95.5, 143.2, 80.1, 101.0])
    stats = agreement(true + 3.5, true)
    assert stats["bias"] == pytest.approx(3.5)
    assert stats["loa_high"] - stats["loa_low"] == pytest.approx(0.0, abs=1e-9)
    assert stats["loa_low"] == pytest.approx(3.5)
    assert stats["mae"] == pytest.approx(3.5)
    assert stats["corr"] == pytest.approx(1.0)
    assert stats["n"] == 5


def test_agreement_random_matches_numpy():
    rng = np.random.default_rng(7)
    true = rng.normal(150, 30, 40)
    pred = true + rng.normal(-2.0, 8.0, 40)
    stats = agreement(list(pred), list(true))
    diff = pred - true
    sd = math.sqrt(sum((d - diff.mean()) ** 2 for d in diff) / (len(diff) - 1))
    assert stats["corr"] == pytest.approx(np.corrcoef(pred, true)[0, 1], abs=1e-12)
    assert stats["bias"] == pytest.approx(sum(diff) / len(diff), abs=1e-12)
    assert stats["loa_low"] == pytest.approx(diff.mean() - 1.96 * sd, abs=1e-9)
    assert stats["loa_high"] == pytest.approx(diff.mean() + 1.96 * sd, abs=1e-9)
    assert stats["mae"] == pytest.approx(sum(abs(d) for d in diff) / len(diff), abs=1e-12)
    assert stats["n"] == 40


def test_agreement_drops_nan_pairs():
    pred = [1.0, math.nan, 3.0, 4.0, 7.0]
    true = [1.5, 2.0, math.nan, 3.0, 6.0]
    stats = agreement(pred, true)
    assert stats["n"] == 3
    assert stats == pytest.approx(agreement([1.0, 4.0, 7.0], [1.5, 3.0, 6.0]))
    assert stats["bias"] == pytest.approx((-0.5 + 1.0 + 1.0) / 3)


def test_agreement_too_few_and_constant(recwarn):
    few = agreement([1.0, math.nan], [2.0, 3.0])
    assert few["n"] == 1
    assert all(math.isnan(few[k]) for k in ("corr", "bias", "loa_low", "loa_high", "mae"))
    const = agreement([5.0, 5.0, 5.0], [5.0, 5.0, 5.0])
    assert const["n"] == 3 and math.isnan(const["corr"])
    assert const["bias"] == 0.0 and const["mae"] == 0.0
    assert len(recwarn) == 0  # no RuntimeWarning from a 0/0 correlation
    with pytest.raises(ValueError, match="length"):
        agreement([1.0, 2.0], [1.0])


def test_indices_table_groups_by_index():
    rng = np.random.default_rng(3)
    truth = {"LV_EDV": rng.normal(150, 20, 6), "LV_EF": rng.normal(55, 10, 6)}
    rows = [
        {"patient": f"patient{i:03d}", "index": name, "pred": float(values[i] + i), "true": float(values[i])}
        for name, values in truth.items()
        for i in range(6)
    ]
    table = indices_table(rows)
    assert list(table) == ["LV_EDV", "LV_EF"]
    for name, values in truth.items():
        assert table[name] == pytest.approx(agreement(values + np.arange(6), values))
        assert table[name]["bias"] == pytest.approx(2.5)


def test_write_indices_csv_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        ind = cardiac_indices(random_label(i), random_label(i + 10), SPACING_ED, SPACING_ES)
        rows.append({"patient": f"patient{i + 1:03d}", **ind})
    rows[1]["LV_EF"] = math.nan
    rows[2]["LV_EDV"] = np.float64(rng.random())
    path = write_indices_csv(rows, tmp_path / "out" / "indices.csv")
    assert path == tmp_path / "out" / "indices.csv"
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["patient", *INDEX_NAMES]
        back = list(reader)
    assert [r["patient"] for r in back] == ["patient001", "patient002", "patient003"]
    for row, got in zip(rows, back):
        for name in INDEX_NAMES:
            want = float(row[name])
            assert (math.isnan(want) and math.isnan(float(got[name]))) or float(got[name]) == want, name
    assert [p.name for p in path.parent.iterdir()] == ["indices.csv"]  # no temp file left


def test_index_units():
    assert [index_unit(n) for n in INDEX_NAMES] == ["ml", "ml", "%", "ml", "ml", "%", "g", "g"]


def test_bland_altman_figure_writes_png(tmp_path):
    rng = np.random.default_rng(1)
    pairs = {}
    for name in ("LV_EDV", "LV_EF", "MYO_mass_g"):
        true = rng.normal(100, 20, 12)
        pairs[name] = (list(true + rng.normal(1, 5, 12)), list(true))
    pairs["LV_EF"][0][3] = math.nan  # NaN pairs are dropped, not drawn
    path = save_bland_altman_figure(tmp_path / "ba.png", pairs, title="indices")
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[1] > pixels.shape[0]  # three panels side by side
    assert [p.name for p in Path(tmp_path).iterdir()] == ["ba.png"]
    with pytest.raises(ValueError):
        save_bland_altman_figure(tmp_path / "none.png", {})


#: a normal adult heart: nothing implausible
NORMAL_ROW = {
    "LV_EDV": 150.0,
    "LV_ESV": 60.0,
    "LV_EF": 60.0,
    "RV_EDV": 160.0,
    "RV_ESV": 70.0,
    "RV_EF": 56.25,
    "MYO_mass_g": 120.0,
    "MYO_ES_mass_g": 118.0,
}


def test_plausible_ranges_cover_every_index():
    assert set(PLAUSIBLE_RANGES) == set(INDEX_NAMES)
    assert PLAUSIBLE_RANGES["LV_EDV"] == (10.0, 600.0) and PLAUSIBLE_RANGES["RV_ESV"] == (3.0, 550.0)
    assert PLAUSIBLE_RANGES["LV_EF"] == (5.0, 90.0) and PLAUSIBLE_RANGES["MYO_mass_g"] == (30.0, 400.0)
    assert implausible(NORMAL_ROW) == []


@pytest.mark.parametrize("name", INDEX_NAMES)
def test_implausible_flags_each_bound_on_both_sides(name):
    low, high = PLAUSIBLE_RANGES[name]
    unit = index_unit(name)
    for value, want in (
        (low - 0.01, [f"{name}<{low:g}{unit}"]),
        (low, []),
        (low + 0.01, []),
        (high - 0.01, []),
        (high, []),
        (high + 0.01, [f"{name}>{high:g}{unit}"]),
    ):
        assert implausible({**NORMAL_ROW, name: value}) == want, (name, value)


def test_implausible_names_impossible_relations():
    # the case: an RV of 1 ml at ED and more at ES (ESV > EDV: EF -50 %)
    row = indices_from_volumes({"RV": 1.0, "MYO": 110.0, "LV": 150.0}, {"RV": 1.5, "MYO": 110.0, "LV": 60.0})
    assert row["RV_EF"] == pytest.approx(-50.0)
    assert implausible(row) == ["RV_EDV<10ml", "RV_ESV<3ml", "RV_EF<0%"]  # not also RV_EF<5%
    assert implausible({**NORMAL_ROW, "LV_EF": 100.5}) == ["LV_EF>100%"]  # not also LV_EF>90%
    assert implausible({**NORMAL_ROW, "LV_EF": -0.1}) == ["LV_EF<0%"]
    # no LV cavity at ED: EDV 0 and an undefined EF
    empty = indices_from_volumes({"RV": 160.0, "MYO": 110.0, "LV": 0.0}, {"RV": 70.0, "MYO": 110.0, "LV": 0.0})
    assert implausible(empty) == ["LV_EDV<10ml", "LV_ESV<3ml", "LV_EF=NaN"]


def test_implausible_passes_acdc_pathologies_and_skips_missing():
    dcm = {**NORMAL_ROW, "LV_EDV": 480.0, "LV_ESV": 430.0, "LV_EF": 100 * 50 / 480, "MYO_mass_g": 260.0}
    hcm = {**NORMAL_ROW, "LV_EDV": 110.0, "LV_ESV": 20.0, "LV_EF": 100 * 90 / 110, "MYO_mass_g": 350.0}
    arv = {**NORMAL_ROW, "RV_EDV": 420.0, "RV_ESV": 340.0, "RV_EF": 100 * 80 / 420}
    minf = {**NORMAL_ROW, "LV_EDV": 260.0, "LV_ESV": 220.0, "LV_EF": 100 * 40 / 260, "MYO_mass_g": 140.0}
    for row in (dcm, hcm, arv, minf):
        assert implausible(row) == [], row
    assert implausible({"patient": "p", "LV_EDV": "4.5", "LV_EF": ""}) == ["LV_EDV<10ml"]  # a CSV row read back
    assert implausible({}) == []


def test_write_indices_csv_adds_flags_only_when_rows_carry_them(tmp_path):
    rows = [{"patient": "p1", **NORMAL_ROW, "flags": ""}, {"patient": "p2", **NORMAL_ROW, "RV_EDV": 1.0}]
    rows[1]["flags"] = ";".join(implausible(rows[1]))
    with open(write_indices_csv(rows, tmp_path / "with.csv"), newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["patient", *INDEX_NAMES, "flags"]
        assert [r["flags"] for r in reader] == ["", "RV_EDV<10ml"]
    plain = [{k: v for k, v in r.items() if k != "flags"} for r in rows]
    with open(write_indices_csv(plain, tmp_path / "without.csv"), newline="") as fh:
        assert csv.DictReader(fh).fieldnames == ["patient", *INDEX_NAMES]
