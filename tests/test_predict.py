"""``fcl-lightning predict``: label maps in each scan's own geometry, the inverse preprocessing
round trip, the indices CSV, and one clear error per bad input."""

import csv
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from support import FINETUNE, run_cli

from fcl_lightning.cli import main
from fcl_lightning.data.nifti import voxel_affine
from fcl_lightning.data.phantom import PhantomSource, write_acdc_layout
from fcl_lightning.data.preprocess import Preprocessor
from fcl_lightning.predict import preprocess_traced, to_native

ACDC = Path(os.environ.get("FCL_ACDC_ROOT", "/nonexistent"))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetuned")
    main(["fit", *FINETUNE, f"--trainer.default_root_dir={root}"])
    scans = write_acdc_layout(PhantomSource(num_subjects=2, num_sites=1, size=64, seed=7), str(root / "scans"))
    return root, Path(scans)


def dice(a: np.ndarray, b: np.ndarray, c: int) -> float:
    return 2 * float(((a == c) & (b == c)).sum()) / max(1, float((a == c).sum() + (b == c).sum()))


def round_trip(pre: Preprocessor, image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A label map's one-hot through the preprocessing and back (``to_native``), then the argmax:
    what a perfect prediction on the preprocessed grid becomes on the scan's grid."""
    onehot = np.eye(4, dtype=np.float32)[label].transpose(3, 0, 1, 2)
    t, data = preprocess_traced(pre, image, affine, onehot)
    return to_native(t, data["image"], data["label"].as_tensor(), image.shape).argmax(0).numpy()


def test_preprocessing_then_inversion_gives_back_the_label_map():
    src = PhantomSource(num_subjects=1, num_sites=1, size=96, seed=3)
    raw = src.load(src.records()[0])
    back = round_trip(Preprocessor(spacing=1.0, size=128), raw.image, raw.label, raw.affine)
    assert back.shape == raw.label.shape
    for c in (1, 2, 3):
        assert dice(back, raw.label, c) >= 0.99, c


@pytest.mark.skipif(not ACDC.is_dir(), reason="set FCL_ACDC_ROOT to the ACDC training folder to run")
def test_round_trip_on_acdc_at_the_fine_tuning_resolution():
    from fcl_lightning.data.nifti import read_nifti_pair

    for pid in (1, 42, 85):
        folder = ACDC / f"patient{pid:03d}"
        stem = sorted(p.name for p in folder.glob("*_frame??.nii.gz"))[0][: -len(".nii.gz")]
        raw = read_nifti_pair(folder / f"{stem}.nii.gz", folder / f"{stem}_gt.nii.gz", stem)
        back = round_trip(Preprocessor(spacing=1.367, size=192), raw.image, raw.label, raw.affine)
        for c in (1, 2, 3):
            assert dice(back, raw.label, c) >= 0.99, (stem, c)


def test_predict_writes_label_maps_in_the_scans_geometry(finetuned, capsys):
    root, scans = finetuned
    out = root / "pred"
    code, stdout, err = run_cli(
        ["predict", *FINETUNE, f"--ckpt_path={root}/checkpoints/last.ckpt", f"--input={scans}", f"--output={out}"],
        capsys,
    )
    assert code == 0, err
    assert f"outputs in {out}: 4 label maps (client 0's model, last.ckpt), volumes.csv, indices.csv" in stdout
    for img_path in sorted(scans.glob("patient*/*_frame??.nii.gz")):
        img = nib.load(img_path)
        seg = nib.load(out / img_path.name.replace(".nii.gz", "_seg.nii.gz"))
        assert seg.shape == img.shape and seg.get_data_dtype() == np.uint8
        assert np.allclose(seg.affine, img.affine, atol=1e-5)
        assert np.allclose(voxel_affine(seg), voxel_affine(img), atol=1e-5)
        assert seg.header.get_zooms() == img.header.get_zooms()
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 3}
    rows = list(csv.DictReader(open(out / "indices.csv")))
    assert [r["patient"] for r in rows] == ["patient001", "patient002"]
    assert {"LV_EDV", "LV_ESV", "LV_EF", "RV_EF", "MYO_mass_g"} <= set(rows[0])
    assert len(list(csv.DictReader(open(out / "volumes.csv")))) == 4
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow  # two more predict runs (make test-slow)
def test_predict_segments_a_4d_cine_frame_by_frame(finetuned, tmp_path, capsys):
    root, scans = finetuned
    frames = sorted((scans / "patient001").glob("*_frame??.nii.gz"))
    imgs = [nib.load(f) for f in frames]
    cine = np.stack([np.asarray(i.dataobj, dtype=np.float32) for i in imgs], axis=-1)
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(cine, imgs[0].affine, imgs[0].header), tmp_path / "in" / "p1_4d.nii.gz")
    code, _, err = run_cli(
        ["predict", *FINETUNE, f"--ckpt_path={root}/checkpoints/last.ckpt", f"--input={tmp_path / 'in'}",
         f"--output={tmp_path / 'out'}", "--client=1"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    seg = nib.load(tmp_path / "out" / "p1_4d_seg.nii.gz")
    assert seg.shape == cine.shape and np.allclose(seg.affine, imgs[0].affine, atol=1e-5)
    # frame t of the cine is segmented as the 3D frame alone would be
    code, _, err = run_cli(
        ["predict", *FINETUNE, f"--ckpt_path={root}/checkpoints/last.ckpt", f"--input={frames[1]}",
         f"--output={tmp_path / 'one'}", "--client=1"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    one = np.asarray(nib.load(tmp_path / "one" / frames[1].name.replace(".nii.gz", "_seg.nii.gz")).dataobj)
    assert np.array_equal(np.asarray(seg.dataobj)[..., 1], one)


def test_predict_bad_inputs_are_one_line_and_write_nothing(finetuned, tmp_path, capsys):
    from fcl_lightning.federation.checkpoint import FORMAT
    from fcl_lightning.predict import PredictInputError, Scan, find_scans, predict_scans

    root, scans = finetuned
    good = sorted((scans / "patient001").glob("*_frame??.nii.gz"))[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "junk.nii.gz").write_bytes(b"not a nifti")
    img = nib.load(good)
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), bad / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine), bad / "nospacing.nii")
    raw = bytearray((bad / "nospacing.nii").read_bytes())
    raw[80:92] = np.zeros(3, "<f4").tobytes()  # pixdim[1:4] = 0 (nibabel would not write it)
    (bad / "nospacing.nii").write_bytes(bytes(raw))
    out = tmp_path / "out"
    for name, needle in (
        ("junk.nii.gz", "junk.nii.gz: cannot read the image"),
        ("flat.nii.gz", "flat.nii.gz: not a 3D or 4D image"),
        ("nospacing.nii", "nospacing.nii: the header gives no voxel spacing"),
    ):  # a good scan first: every input is checked before anything is written
        with pytest.raises(PredictInputError, match=needle.replace(".", r"\.")):
            predict_scans(torch.nn.Identity(), None, [Scan(good, "good"), Scan(bad / name, "x")], out)
        assert not out.exists()
    with pytest.raises(PredictInputError, match="is the folder of the input"):
        predict_scans(torch.nn.Identity(), None, [Scan(good, "good")], good.parent)
    with pytest.raises(PredictInputError, match="does not exist"):
        find_scans(str(tmp_path / "nothing-here"))
    assert not list(good.parent.glob("*_seg.nii.gz"))
    # through the command: one error line, exit 2
    pre_ckpt = tmp_path / "pre.ckpt"  # what a pre-training run's checkpoint says it is
    torch.save({"format": FORMAT, "module": "ContrastivePretrainModule", "round": 1, "global": {}}, pre_ckpt)
    base = ["predict", *FINETUNE, f"--output={out}"]
    for extra, needle in (
        ([f"--input={bad / 'junk.nii.gz'}", f"--ckpt_path={root}/checkpoints/last.ckpt"], "cannot read the image"),
        ([f"--input={good}", f"--ckpt_path={pre_ckpt}"], "not of fine-tuning"),
        (
            [f"--input={good}", f"--ckpt_path={root}/checkpoints/last.ckpt", "--client=7"],
            "holds the models of clients [0, 1]",
        ),
    ):
        code, _, err = run_cli([*base, *extra], capsys)
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(errors) == 1 and needle in errors[0], (needle, err)
        assert "Traceback" not in err and not out.exists()


ZOOMS = (5.0, 5.0, 10.0)  # 0.25 ml a voxel


def label_scan(path: Path, rv: int, myo: int, lv: int) -> Path:
    """A 16x16x4 image whose voxels are ACDC labels: ``rv`` of 1, ``myo`` of 2, ``lv`` of 3 (see
    :func:`image_is_its_label`); spacing :data:`ZOOMS`."""
    flat = np.zeros(16 * 16 * 4, np.float32)
    flat[:lv] = 3
    flat[lv : lv + myo] = 2
    flat[lv + myo : lv + myo + rv] = 1
    nib.save(nib.Nifti1Image(flat.reshape(16, 16, 4), np.diag([*ZOOMS, 1.0])), path)
    return path


def image_is_its_label(net, pre, image, affine, batch_size):
    """Stands in for ``segment_frame``: the "segmentation" of a :func:`label_scan` image is its voxels."""
    return image.astype(np.uint8), None


def scan_inputs(tmp_path: Path, more_single: int = 0) -> tuple[Path, Path]:
    """A plain folder of two images (no frames known), and a manifest naming patient001's ED and ES
    (an RV of 1 ml at ED, 1.5 ml at ES: implausible) and patient007's ED only (plus ``more_single``
    patients with an ED only)."""
    folder, framed = tmp_path / "plain", tmp_path / "framed"
    folder.mkdir()
    framed.mkdir()
    label_scan(folder / "a.nii.gz", 400, 400, 500)
    label_scan(folder / "b.nii.gz", 400, 400, 200)
    lines = ["image,patient,frame"]
    for name, patient, frame, rv, lv in (
        ("p1_ed", "patient001", "ED", 4, 500),
        ("p1_es", "patient001", "ES", 6, 200),
        ("p7_ed", "patient007", "ED", 400, 500),
        *((f"q{i}_ed", f"patient1{i:02d}", "ED", 400, 500) for i in range(more_single)),
    ):
        label_scan(framed / f"{name}.nii.gz", rv, 400, lv)
        lines.append(f"{name}.nii.gz,{patient},{frame}")
    (framed / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder, framed / "manifest.csv"


def test_predict_says_why_there_are_no_indices_and_flags_implausible_ones(tmp_path, monkeypatch):
    import fcl_lightning.predict as pr

    monkeypatch.setattr(pr, "segment_frame", image_is_its_label)
    folder, manifest = scan_inputs(tmp_path)
    # a plain folder: volumes, but no frame of any patient, hence no indices.csv and the reason
    res = pr.predict_scans(torch.nn.Identity(), None, pr.find_scans(str(folder)), tmp_path / "out1")
    assert res["no_indices"] == [pr.NO_FRAMES_REASON] and res["indices"] == []
    assert "no input names its ED and ES frame" in pr.NO_FRAMES_REASON and "Info.cfg" in pr.NO_FRAMES_REASON
    assert sorted(f.name for f in res["files"]) == ["a_seg.nii.gz", "b_seg.nii.gz", "volumes.csv"]
    assert not (tmp_path / "out1" / "indices.csv").exists()
    # a manifest: patient007 has only its ED frame; patient001's RV is implausible
    res = pr.predict_scans(torch.nn.Identity(), None, pr.find_scans(str(manifest)), tmp_path / "out2")
    assert res["no_indices"] == ["patient007: only ED, no ES frame: no indices"]
    rows = list(csv.DictReader(open(tmp_path / "out2" / "indices.csv")))
    assert [r["patient"] for r in rows] == ["patient001"]
    assert float(rows[0]["RV_EDV"]) == 1.0 and float(rows[0]["RV_EF"]) == -50.0 and float(rows[0]["LV_EF"]) == 60.0
    assert rows[0]["flags"] == "RV_EDV<10ml;RV_ESV<3ml;RV_EF<0%" == res["indices"][0]["flags"]


def test_missing_indices_reasons():
    from fcl_lightning.predict import NO_FRAMES_REASON, Scan, missing_indices

    def scan(name, patient=None, frame=None):
        return Scan(Path(f"{name}.nii.gz"), name, patient, frame)

    assert missing_indices([(scan("a"), 3), (scan("b"), 4)]) == [NO_FRAMES_REASON]
    assert missing_indices([(scan("a", "a", "frame01"), 3)]) == [
        NO_FRAMES_REASON + "; the frames given ('frame01') are not 'ED' / 'ES'"
    ]
    assert missing_indices([(scan("e", "p1", "ED"), 3), (scan("s", "p1", "ES"), 3)]) == []
    assert missing_indices(
        [(scan("e", "p1", "ED"), 4), (scan("s", "p1", "ES"), 3), (scan("s2", "p2", "ES"), 3), (scan("x"), 3)]
    ) == [
        "p1: the ED image is a 4D cine, not one 3D frame: no indices",
        "p2: only ES, no ED frame: no indices",
        "1 input names no patient's ED or ES frame (x): no indices from them",
    ]


def test_predict_prints_the_reasons_and_the_implausible_patients(finetuned, tmp_path, capsys, monkeypatch):
    import fcl_lightning.predict as pr

    monkeypatch.setattr(pr, "segment_frame", image_is_its_label)
    root, _ = finetuned
    folder, manifest = scan_inputs(tmp_path, more_single=5)
    base = ["predict", *FINETUNE, f"--ckpt_path={root}/checkpoints/last.ckpt"]
    code, out, err = run_cli([*base, f"--input={folder}", f"--output={tmp_path / 'out1'}"], capsys)
    assert code == 0, err
    assert "2 label maps" in out and pr.NO_FRAMES_REASON in out.splitlines()
    code, out, err = run_cli([*base, f"--input={manifest}", f"--output={tmp_path / 'out2'}"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    # six one-frame patients: the count, then the first five
    assert "6 patients or inputs without cardiac indices; the first 5:" in lines
    assert "patient007: only ED, no ES frame: no indices" in lines
    assert "patient103: only ED, no ES frame: no indices" in lines
    assert not any(ln.startswith("patient104") for ln in lines)  # the sixth, sorted last
    assert "patient001: implausible indices RV_EDV<10ml, RV_ESV<3ml, RV_EF<0%: check the segmentation" in lines


def test_predict_is_offered(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "predict" in out
    code, out, _ = run_cli(["predict", "--help"], capsys)
    assert code == 0 and "--input" in out and "--output" in out and "--client" in out


def test_test_scores_native_and_preprocessed_grids_and_the_indices(finetuned, capsys, monkeypatch):
    """``test --space native`` compares with the original label maps on the scans' grids; with the
    prediction replaced by the truth both spaces give Dice 1 and indices with zero bias, and the
    true indices equal voxel counts x voxel volume computed here independently."""
    import json

    import fcl_lightning.predict as pr

    root, _ = finetuned
    args = [*FINETUNE, f"--trainer.default_root_dir={root}", "--ckpt_path=last"]
    code, out, err = run_cli(["test", *args], capsys)  # native is the default
    assert code == 0, err
    assert "scored on the native grid" in out and "cardiac indices of" in out
    summary = json.loads((root / "summary.json").read_text())
    assert summary["test/space"] == "native" and "test/indices/LV_EF/bias" in summary
    assert (root / "test_bland_altman.png").stat().st_size > 0
    rows = list(csv.DictReader(open(root / "test_indices.csv")))
    src = PhantomSource(num_subjects=2, num_sites=2, size=64, seed=12345)  # the config's test_source
    by_key = {(r.patient, r.frame): r for r in src.records()}
    for row in rows:
        vox = {}
        for frame in ("ED", "ES"):
            raw = src.load(by_key[(row["patient"], frame)])
            ml = float(np.prod(np.linalg.norm(raw.affine[:3, :3], axis=0))) / 1000
            vox[frame] = {c: int((raw.label == c).sum()) * ml for c in (1, 2, 3)}
        assert abs(float(row["LV_EDV_true"]) - vox["ED"][3]) < 1e-6
        assert abs(float(row["RV_ESV_true"]) - vox["ES"][1]) < 1e-6
        assert abs(float(row["MYO_mass_g_true"]) - 1.05 * vox["ED"][2]) < 1e-6
    per = list(csv.DictReader(open(root / "test_per_patient.csv")))
    assert {r["space"] for r in per} == {"native"}

    # the truth as the prediction: native rows compare the same grid, so everything agrees exactly
    def oracle(net, pre, image, affine, batch_size):
        for rec in src.records():
            raw = src.load(rec)
            if raw.image.shape == image.shape and np.array_equal(raw.image, image):
                return raw.label.astype(np.uint8), None
        raise AssertionError("volume not found")

    monkeypatch.setattr(pr, "segment_frame", oracle)
    code, out, err = run_cli(["test", *args], capsys)
    assert code == 0, err
    summary = json.loads((root / "summary.json").read_text())
    assert summary["test/dice_mean"] == 1.0 and summary["test/indices/LV_EDV/bias"] == 0.0


def test_one_output_folder_holds_one_predict_run(finetuned, tmp_path, capsys):
    """A second predict of other inputs into the same folder is refused (its CSVs could not cover the
    first one's label maps); the same inputs again are fine; a folder another predict holds is busy."""
    from fcl_lightning.federation.lock import RunLock

    root, scans = finetuned
    args = ["predict", *FINETUNE, f"--trainer.default_root_dir={root}", "--ckpt_path=last"]
    out = tmp_path / "pred"
    first = scans / "patient001"
    code, _, err = run_cli([*args, f"--input={first}", f"--output={out}"], capsys)
    assert code == 0, err
    before = sorted(p.name for p in out.iterdir())
    code, _, err = run_cli([*args, f"--input={scans / 'patient002'}", f"--output={out}"], capsys)
    assert code == 2 and "holds 2 label map(s) of other inputs" in err and err.count("error:") == 1, err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written
    code, _, err = run_cli([*args, f"--input={first}", f"--output={out}"], capsys)
    assert code == 0, err
    with RunLock(out):
        code, _, err = run_cli([*args, f"--input={first}", f"--output={out}"], capsys)
    assert code == 2 and "(--output) is in use by another run" in err, err


def truncated_scan(path: Path) -> Path:
    """A .nii.gz whose header reads but whose voxels do not (the file cut in the middle of its data)."""
    flat = np.random.default_rng(0).random((64, 64, 8), dtype=np.float32)
    nib.save(nib.Nifti1Image(flat, np.diag([*ZOOMS, 1.0])), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("on_bad_scan", ["stop", "skip"])
def test_predict_streams_and_a_scan_that_fails_only_when_decoded_is_named(tmp_path, monkeypatch, on_bad_scan):
    """Every header is checked before anything is written; then each scan is decoded, segmented and
    written before the next is decoded; a scan that fails to decode stops the run or is skipped,
    and volumes.csv's status column says which."""
    import fcl_lightning.predict as pr

    events = []
    real_read, real_save = pr.read_scan, pr.save_label_map
    monkeypatch.setattr(pr, "segment_frame", image_is_its_label)
    monkeypatch.setattr(pr, "read_scan", lambda s: events.append(("read", s.name)) or real_read(s))
    monkeypatch.setattr(
        pr, "save_label_map", lambda seg, img, p: events.append(("save", p.name)) or real_save(seg, img, p)
    )
    folder = tmp_path / "in"
    folder.mkdir()
    label_scan(folder / "a.nii.gz", 400, 400, 500)
    truncated_scan(folder / "b.nii.gz")
    label_scan(folder / "c.nii.gz", 400, 400, 200)
    out = tmp_path / "out"
    scans = pr.find_scans(str(folder))
    if on_bad_scan == "stop":
        with pytest.raises(pr.PredictInputError, match="b.nii.gz: cannot read the image.*after 1 of 3 scans"):
            pr.predict_scans(torch.nn.Identity(), None, scans, out, on_bad_scan=on_bad_scan)
        assert events == [("read", "a"), ("save", "a_seg.nii.gz"), ("read", "b")]
    else:
        res = pr.predict_scans(torch.nn.Identity(), None, scans, out, on_bad_scan=on_bad_scan)
        assert events == [
            ("read", "a"),
            ("save", "a_seg.nii.gz"),
            ("read", "b"),
            ("read", "c"),
            ("save", "c_seg.nii.gz"),
        ]
        assert len(res["bad"]) == 1 and "b.nii.gz" in res["bad"][0]
    rows = {r["image"]: r["status"] for r in csv.DictReader(open(out / "volumes.csv"))}
    assert rows["a"] == "ok" and rows["b"].startswith("failed: " if on_bad_scan == "stop" else "skipped: ")
    assert ("c" in rows) == (on_bad_scan == "skip")


def test_a_bad_header_stops_predict_before_anything_is_written(tmp_path, monkeypatch):
    import fcl_lightning.predict as pr

    monkeypatch.setattr(pr, "segment_frame", image_is_its_label)
    folder = tmp_path / "in"
    folder.mkdir()
    label_scan(folder / "a.nii.gz", 400, 400, 500)
    (folder / "z.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(pr.PredictInputError, match="z.nii.gz: cannot read the image"):
        pr.predict_scans(torch.nn.Identity(), None, pr.find_scans(str(folder)), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
