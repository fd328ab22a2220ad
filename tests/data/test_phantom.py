"""The built-in phantom: label convention, anatomy base -> apex, ED vs ES, sites, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fcl_lightning.data.phantom import SITE_SPACINGS, PhantomSource, write_acdc_layout
from fcl_lightning.data.volume import DataError


@pytest.fixture(scope="module")
def phantom() -> PhantomSource:
    return PhantomSource(num_subjects=10, num_sites=4, seed=0)


@pytest.fixture(scope="module")
def volumes(phantom: PhantomSource) -> dict:
    return {r.key: phantom.load(r) for r in phantom.records()}


def test_records(phantom: PhantomSource) -> None:
    recs = phantom.records()
    assert len(recs) == 20
    assert recs[0].key == "phantom001_ED" and recs[1].key == "phantom001_ES"
    assert recs[0].patient == "phantom001" and recs[0].image_path is None
    assert {r.site for r in recs} == {0, 1, 2, 3}
    assert {r.group for r in recs} == {f"G{i}" for i in range(5)}
    assert len({r.key for r in recs}) == len(recs)
    r = recs[7]  # subject index 3
    assert (r.site, r.group, r.frame) == (3, "G3", "ES")


def test_arrays_and_labels(phantom: PhantomSource, volumes: dict) -> None:
    for v in volumes.values():
        assert v.image.dtype == np.float32 and v.label.dtype == np.uint8
        assert v.image.shape == v.label.shape and v.image.shape[:2] == (144, 144)
        assert 8 <= v.image.shape[2] <= 12
        assert set(np.unique(v.label).tolist()) <= {0, 1, 2, 3}
        assert np.all(np.isfinite(v.image)) and v.image.min() >= 0


def test_anatomy_base_to_apex(volumes: dict) -> None:
    for key, v in volumes.items():
        base, apex = v.label[:, :, 0], v.label[:, :, -1]
        assert set(np.unique(base).tolist()) == {0, 1, 2, 3}, key
        assert not np.any(apex == 1), f"{key}: RV present at apex"
        assert not np.any(v.label[:, :, -2] == 1), f"{key}: RV present one slice above apex"
        assert (apex == 3).sum() < (base == 3).sum(), key
        assert (apex == 2).sum() > 0, f"{key}: myocardium missing at apex"
        # The LV is brighter than the myocardium on every slice (whatever the site's gamma / gain).
        for z in range(v.image.shape[2]):
            img, lab = v.image[:, :, z], v.label[:, :, z]
            assert img[lab == 3].mean() > img[lab == 2].mean(), key


def test_ed_cavity_larger_than_es(phantom: PhantomSource, volumes: dict) -> None:
    for i in range(phantom.num_subjects):
        ed, es = volumes[f"phantom{i + 1:03d}_ED"], volumes[f"phantom{i + 1:03d}_ES"]
        assert ed.image.shape == es.image.shape
        assert (ed.label == 3).sum() > (es.label == 3).sum()
        # myocardial area is roughly conserved, so the wall is thicker at ES
        ratio = (es.label == 2).sum() / (ed.label == 2).sum()
        assert 0.8 < ratio < 1.25


def test_site_spacing_in_affine(phantom: PhantomSource, volumes: dict) -> None:
    for r in phantom.records():
        affine = volumes[r.key].affine
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        assert spacing[0] == pytest.approx(SITE_SPACINGS[r.site % 4])
        assert spacing[1] == pytest.approx(spacing[0])
        assert 5.0 <= spacing[2] <= 10.0


def test_determinism(phantom: PhantomSource, volumes: dict) -> None:
    again = PhantomSource(num_subjects=10, num_sites=4, seed=0)
    rec = phantom.records()[5]
    a = again.load(rec)  # loaded in a different order than the fixture: still identical
    np.testing.assert_array_equal(a.image, volumes[rec.key].image)
    np.testing.assert_array_equal(a.label, volumes[rec.key].label)
    other = PhantomSource(num_subjects=10, num_sites=4, seed=1).load(rec)
    assert other.image.shape != a.image.shape or not np.array_equal(other.image, a.image)
    assert PhantomSource(seed=1).fingerprint(rec) != phantom.fingerprint(rec)
    # more subjects do not change the existing ones
    np.testing.assert_array_equal(PhantomSource(num_subjects=20).load(rec).label, volumes[rec.key].label)


def test_bad_key(phantom: PhantomSource) -> None:
    from fcl_lightning.data.volume import VolumeRecord

    with pytest.raises(DataError, match="phantom011_ED"):
        phantom.load(VolumeRecord(key="phantom011_ED", patient="phantom011"))
    with pytest.raises(DataError, match="patient001_ED"):
        phantom.load(VolumeRecord(key="patient001_ED", patient="patient001"))


def test_write_acdc_layout(tmp_path: Path) -> None:
    src = PhantomSource(num_subjects=2, size=80, min_slices=6, max_slices=7)
    root = write_acdc_layout(src, str(tmp_path / "out"), dtype="int16")
    assert sorted(p.name for p in root.iterdir()) == ["patient001", "patient002"]
    files = sorted(p.name for p in (root / "patient002").iterdir())
    info = dict(line.split(": ") for line in (root / "patient002" / "Info.cfg").read_text().splitlines())
    es = int(info["ES"])
    assert info["ED"] == "1" and info["Group"] == "G1" and int(info["NbFrame"]) >= es > 1
    assert files == sorted(
        [
            "Info.cfg",
            "patient002_frame01.nii.gz",
            "patient002_frame01_gt.nii.gz",
            f"patient002_frame{es:02d}.nii.gz",
            f"patient002_frame{es:02d}_gt.nii.gz",
        ]
    )
    with pytest.raises(ValueError, match="dtype"):
        write_acdc_layout(src, str(tmp_path / "bad"), dtype="float64")
