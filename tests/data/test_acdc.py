"""ACDC reader on phantoms written in ACDC layout: dtypes, Info.cfg, id selection, bad inputs."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fcl_lightning.data.acdc import ACDCSource, parse_id_range
from fcl_lightning.data.phantom import PhantomSource
from fcl_lightning.data.preprocess import Preprocessor
from fcl_lightning.data.volume import DataError


@pytest.mark.parametrize("dtype", ["float32", "int16", "uint8"])
def test_loads_every_stored_dtype(acdc_templates: dict[str, Path], small_phantom: PhantomSource, dtype: str) -> None:
    root = acdc_templates[dtype]
    img = nib.load(str(root / "patient001" / "patient001_frame01.nii.gz"))
    assert img.get_data_dtype() == np.dtype(dtype)
    phantom = small_phantom
    src = ACDCSource(str(root), patients="1-3")
    for rec, ph_rec in zip(src.records(), phantom.records(), strict=True):
        raw, ref = src.load(rec), phantom.load(ph_rec)
        assert raw.image.dtype == np.float32 and raw.label.dtype == np.uint8
        assert raw.image.shape == ref.image.shape
        np.testing.assert_array_equal(raw.label, ref.label)
        # ACDC headers keep the voxel size in pixdim only; the reader must put it back into the affine.
        np.testing.assert_allclose(raw.affine, ref.affine, atol=1e-5)
        if dtype == "float32":
            np.testing.assert_array_equal(raw.image, ref.image)
        else:
            assert np.corrcoef(raw.image.ravel(), ref.image.ravel())[0, 1] > 0.999


def test_records_and_info_cfg(acdc_templates: dict[str, Path]) -> None:
    root = acdc_templates["float32"]
    recs = ACDCSource(str(root), patients="1-3").records()
    assert [r.key for r in recs] == [f"patient00{i}_{f}" for i in (1, 2, 3) for f in ("ED", "ES")]
    es = int(dict(line.split(": ") for line in (root / "patient002" / "Info.cfg").read_text().splitlines())["ES"])
    r = recs[3]
    assert (r.patient, r.frame, r.group, r.site) == ("patient002", "ES", "G1", None)
    assert r.image_path.name == f"patient002_frame{es:02d}.nii.gz"
    assert r.label_path.name == f"patient002_frame{es:02d}_gt.nii.gz"
    assert recs[0].image_path.name == "patient001_frame01.nii.gz"
    only_es = ACDCSource(str(root), patients="1-3", frames=("ES",)).records()
    assert [r.frame for r in only_es] == ["ES"] * 3


def test_patient_selection(acdc_templates: dict[str, Path]) -> None:
    root = str(acdc_templates["float32"])
    assert [r.patient for r in ACDCSource(root, patients="1,3").records()] == ["patient001"] * 2 + ["patient003"] * 2
    assert {r.patient for r in ACDCSource(root, patients="2-3").records()} == {"patient002", "patient003"}
    assert {r.patient for r in ACDCSource(root, patients="2").records()} == {"patient002"}


def test_parse_id_range() -> None:
    assert parse_id_range("1-100") == list(range(1, 101))
    assert parse_id_range("1-20,41-60") == list(range(1, 21)) + list(range(41, 61))
    assert parse_id_range(" 5 ") == [5]
    assert parse_id_range("3, 1-2,2") == [1, 2, 3]
    for bad in ["", "a", "1-", "5-1", "0-3", "1;2", "1-2-3", "-4"]:
        with pytest.raises(DataError, match="bad id selection"):
            parse_id_range(bad)


def test_anisotropic_spacing_resampled(acdc_templates: dict[str, Path]) -> None:
    src = ACDCSource(str(acdc_templates["int16"]), patients="2")  # subject 1: site 1, 1.5 mm in-plane
    rec = src.records()[0]
    raw = src.load(rec)
    in_plane = np.linalg.norm(raw.affine[:3, :3], axis=0)
    assert in_plane[0] == pytest.approx(1.5) and in_plane[2] > 5.0
    vol = Preprocessor(spacing=1.367, size=96)(src, rec)
    assert vol.spacing[:2] == pytest.approx((1.367, 1.367)) and vol.spacing[2] == pytest.approx(in_plane[2])
    assert vol.image.shape == (1, 96, 96, raw.image.shape[2])
    # area scales with (1.5 / 1.367)^2 when resampling (nothing is cropped at this size)
    ratio = (vol.label > 0).sum().item() / (raw.label > 0).sum()
    assert ratio == pytest.approx((1.5 / 1.367) ** 2, rel=0.03)


# -- bad inputs: one DataError naming the patient or file -------------------------------------------


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _frame_files(root: Path, patient: str = "patient001") -> tuple[Path, Path]:
    return root / patient / f"{patient}_frame01.nii.gz", root / patient / f"{patient}_frame01_gt.nii.gz"


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="root folder not found"):
        ACDCSource(str(tmp_path / "nope")).records()


def test_missing_patient_folder(acdc_root: Path) -> None:
    with pytest.raises(DataError, match="patient004: patient folder missing"):
        ACDCSource(str(acdc_root), patients="1-4").records()


def test_info_cfg_without_es(acdc_root: Path) -> None:
    cfg = acdc_root / "patient002" / "Info.cfg"
    cfg.write_text("\n".join(line for line in cfg.read_text().splitlines() if not line.startswith("ES")))
    with pytest.raises(DataError, match=r"patient002: .*Info.cfg has no 'ES:' line"):
        ACDCSource(str(acdc_root), patients="1-3").records()


def test_info_cfg_missing_or_bad(acdc_root: Path) -> None:
    (acdc_root / "patient003" / "Info.cfg").unlink()
    with pytest.raises(DataError, match="patient003: Info.cfg not found"):
        ACDCSource(str(acdc_root), patients="1-3").records()
    (acdc_root / "patient001" / "Info.cfg").write_text("ED: one\nES: 3\n")
    with pytest.raises(DataError, match="patient001: .*ED frame 'one' is not a number"):
        ACDCSource(str(acdc_root), patients="1").records()


def test_missing_frame_file(acdc_root: Path) -> None:
    image, _ = _frame_files(acdc_root, "patient002")
    image.unlink()
    with pytest.raises(DataError, match="patient002: ED image file not found: .*patient002_frame01.nii.gz"):
        ACDCSource(str(acdc_root), patients="1-3").records()


@pytest.mark.parametrize("what", ["image", "label"])
def test_corrupt_nifti(acdc_root: Path, what: str) -> None:
    image, label = _frame_files(acdc_root)
    target = image if what == "image" else label
    target.write_bytes(target.read_bytes()[:-200])  # truncated gzip stream
    src = ACDCSource(str(acdc_root), patients="1")
    with pytest.raises(DataError, match=rf"patient001_ED: cannot read {what} .*{target.name}: corrupt"):
        src.load(src.records()[0])


def test_garbage_nifti(acdc_root: Path) -> None:
    image, _ = _frame_files(acdc_root)
    image.write_bytes(gzip.compress(b"not a nifti file at all"))
    src = ACDCSource(str(acdc_root), patients="1")
    with pytest.raises(DataError, match=r"patient001_ED: cannot read image .*patient001_frame01.nii.gz"):
        src.load(src.records()[0])


def test_shape_mismatch(acdc_root: Path) -> None:
    image, label = _frame_files(acdc_root)
    lab = nib.load(str(label))
    save_nifti(label, np.asarray(lab.dataobj)[:-4], lab.affine)
    src = ACDCSource(str(acdc_root), patients="1")
    with pytest.raises(DataError, match=r"patient001_ED: label .*patient001_frame01_gt.nii.gz has shape"):
        src.load(src.records()[0])


def test_affine_mismatch(acdc_root: Path) -> None:
    image, label = _frame_files(acdc_root)
    src = ACDCSource(str(acdc_root), patients="1")
    img = nib.load(str(image))
    # Same geometry written with a consistent header (spacing in the sform too) still matches...
    save_nifti(label, np.asarray(nib.load(str(label)).dataobj), src.load(src.records()[0]).affine)
    src.load(src.records()[0])
    # ...a 3 mm shift does not.
    shifted = src.load(src.records()[0]).affine.copy()
    shifted[0, 3] += 3.0
    save_nifti(label, np.asarray(nib.load(str(label)).dataobj), shifted)
    assert np.allclose(nib.load(str(label)).header.get_zooms(), img.header.get_zooms())
    with pytest.raises(DataError, match=r"patient001_ED: .*patient001_frame01_gt.nii.gz.* different affines"):
        src.load(src.records()[0])


def test_bad_label_value(acdc_root: Path) -> None:
    _, label = _frame_files(acdc_root)
    lab = nib.load(str(label))
    data = np.asarray(lab.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, lab.affine, lab.header), str(label))
    src = ACDCSource(str(acdc_root), patients="1")
    with pytest.raises(DataError, match=r"patient001_ED: label .*_gt.nii.gz has values \{7\} outside"):
        src.load(src.records()[0])


def test_non_3d_volume(acdc_root: Path) -> None:
    image, _ = _frame_files(acdc_root)
    img = nib.load(str(image))
    data = np.asarray(img.dataobj)
    save_nifti(image, np.stack([data, data], axis=-1), img.affine)
    src = ACDCSource(str(acdc_root), patients="1")
    with pytest.raises(DataError, match=r"patient001_ED: image .*patient001_frame01.nii.gz is not a 3D volume"):
        src.load(src.records()[0])


def test_bad_frames_argument(acdc_root: Path) -> None:
    with pytest.raises(DataError, match="frames"):
        ACDCSource(str(acdc_root), frames=("ED", "XX"))
