"""Manifest reader: CSV and JSON, relative paths, client column, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fcl_lightning.data.manifest import ManifestSource
from fcl_lightning.data.volume import DataError


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    return path


def test_csv_relative_paths_and_client(acdc_root: Path) -> None:
    manifest = _write_csv(
        acdc_root / "list.csv",
        [
            ["image", "label", "patient", "client", "frame", "group"],
            ["patient001/patient001_frame01.nii.gz", "patient001/patient001_frame01_gt.nii.gz", "p1", "0", "ED", "A"],
            ["patient002/patient002_frame01.nii.gz", "patient002/patient002_frame01_gt.nii.gz", "p2", "1", "ED", ""],
            ["patient003/patient003_frame01.nii.gz", "", "", "", "", ""],
        ],
    )
    src = ManifestSource(str(manifest))
    recs = src.records()
    assert [r.key for r in recs] == ["p1_ED", "p2_ED", "patient003_frame01"]
    assert [r.site for r in recs] == [0, 1, None]
    assert [r.group for r in recs] == ["A", None, None]
    assert recs[2].patient == "patient003_frame01" and recs[2].label_path is None
    assert recs[0].image_path == acdc_root / "patient001" / "patient001_frame01.nii.gz"
    raw = src.load(recs[0])
    assert raw.image.dtype == np.float32 and raw.label.dtype == np.uint8 and raw.image.shape == raw.label.shape
    assert src.load(recs[2]).label is None


def test_json_absolute_and_relative(acdc_root: Path) -> None:
    sub = acdc_root / "lists"
    sub.mkdir()
    rows = [
        {"image": str(acdc_root / "patient001" / "patient001_frame01.nii.gz"), "client": 2, "patient": "a"},
        {
            "image": "../patient002/patient002_frame01.nii.gz",
            "label": "../patient002/patient002_frame01_gt.nii.gz",
            "client": "3",
            "patient": "a",
            "frame": "ES",
        },
    ]
    manifest = sub / "list.json"
    manifest.write_text(json.dumps(rows))
    recs = ManifestSource(str(manifest)).records()
    assert [(r.key, r.patient, r.site, r.frame) for r in recs] == [("a", "a", 2, None), ("a_ES", "a", 3, "ES")]
    assert recs[1].label_path is not None and recs[1].label_path.is_file()


def _expect(tmp: Path, rows: list[list[str]], match: str) -> None:
    manifest = _write_csv(tmp / "m.csv", rows)
    with pytest.raises(DataError, match=match):
        ManifestSource(str(manifest)).records()


IMG = "patient001/patient001_frame01.nii.gz"


def test_row_pointing_nowhere(acdc_root: Path) -> None:
    _expect(acdc_root, [["image", "label"], [IMG, ""], ["missing.nii.gz", ""]], r"m\.csv: row 2: image file not found")
    _expect(acdc_root, [["image", "label"], [IMG, "nolabel.nii.gz"]], r"m\.csv: row 1: label file not found")


def test_missing_image_column(acdc_root: Path) -> None:
    _expect(acdc_root, [["label", "patient"], [IMG, "x"]], r"m\.csv: manifest has no 'image' column")


def test_non_integer_client(acdc_root: Path) -> None:
    _expect(acdc_root, [["image", "client"], [IMG, "two"]], r"m\.csv: row 1: client 'two' is not an integer")
    _expect(acdc_root, [["image", "client"], [IMG, "1.5"]], r"m\.csv: row 1: client '1.5'")


def test_duplicate_keys(acdc_root: Path) -> None:
    match = r"m\.csv: row 2: duplicate key 'patient001_frame01' \(same as row 1\)"
    _expect(acdc_root, [["image"], [IMG], [IMG]], match)
    other = "patient002/patient002_frame01.nii.gz"
    _expect(acdc_root, [["image", "patient"], [IMG, "p"], [other, "p"]], r"row 2: duplicate key 'p'")


def test_unknown_column_and_bad_files(acdc_root: Path) -> None:
    _expect(acdc_root, [["image", "lable"], [IMG, IMG]], r"unknown column\(s\) \['lable'\]")
    _expect(acdc_root, [["image"]], "lists no volumes")
    with pytest.raises(DataError, match="manifest not found"):
        ManifestSource(str(acdc_root / "none.csv")).records()
    (acdc_root / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON"):
        ManifestSource(str(acdc_root / "bad.json")).records()
    (acdc_root / "obj.json").write_text('{"image": "x"}')
    with pytest.raises(DataError, match="list of objects"):
        ManifestSource(str(acdc_root / "obj.json")).records()


def test_corrupt_file_in_manifest(acdc_root: Path) -> None:
    path = acdc_root / "patient001" / "patient001_frame01.nii.gz"
    path.write_bytes(path.read_bytes()[:100])
    manifest = _write_csv(acdc_root / "m.csv", [["image"], [IMG]])
    src = ManifestSource(str(manifest))
    with pytest.raises(DataError, match=r"m\.csv:patient001_frame01: cannot read image .*patient001_frame01"):
        src.load(src.records()[0])
