"""``fcl-lightning predict``: segment new scans with a fine-tuned U-Net and write label maps in
each scan's own geometry, plus the cardiac indices of every patient whose ED and ES frames are known.

Each 3D image goes through the fine-tuning config's preprocessing (``Preprocessor.pipeline``: MONAI
orientation, spacing, intensity scaling, pad/crop), is segmented slice by slice, and its class
probabilities are brought back onto the original voxel grid by MONAI's ``Invertd`` (the inverse of
every invertible transform, linear interpolation) before the argmax: a ``<name>_seg.nii.gz`` of the
input's shape, affine and header geometry (uint8). A 4D cine is segmented frame by frame.

Cardiac indices need one patient's ED and ES frame, which only an ACDC-layout root (``Info.cfg``) or
a manifest (``patient`` and ``frame`` columns) names: for other inputs :func:`predict_scans` says why
there are none, and it flags the indices outside wide plausible ranges (:func:`~fcl_lightning.indices.implausible`).
"""

from __future__ import annotations

import csv
import glob
import gzip
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from fcl_lightning.data.acdc import read_info_cfg
from fcl_lightning.data.nifti import nifti_stem, voxel_affine
from fcl_lightning.data.preprocess import Preprocessor
from fcl_lightning.errors import UserError
from fcl_lightning.indices import cardiac_indices, implausible, structure_volumes_ml, write_indices_csv
from fcl_lightning.io import atomic_write, check_writable

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".json")
#: the frames of one patient the cardiac indices come from
INDEX_FRAMES = ("ED", "ES")
#: why ``predict`` writes no ``indices.csv`` when no input names a patient's ED and ES frame
NO_FRAMES_REASON = (
    "no cardiac indices: no input names its ED and ES frame "
    "(an ACDC-layout root's Info.cfg, or a manifest's patient and frame columns, give them)"
)


class PredictInputError(UserError):
    """An input image, input list or output folder ``predict`` cannot use; names the file."""


@dataclass(frozen=True)
class Scan:
    """One input image and what is known about it (patient and ED/ES frame: for the indices)."""

    path: Path
    name: str
    patient: str | None = None
    frame: str | None = None


def is_nifti(path: str | Path) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def _not_a_label(path: Path) -> bool:
    return not nifti_stem(path).endswith(("_gt", "_seg"))


def find_scans(input: str) -> list[Scan]:
    """The images named by ``input``: an ACDC-layout root (``patientXXX/`` with ``Info.cfg``: its ED
    and ES frames), a folder holding a ``manifest.csv`` / ``.tsv`` / ``.json`` (that manifest), a
    folder of NIfTI files (label maps ``*_gt`` / ``*_seg`` left out), a manifest
    (CSV/TSV/JSON with an ``image`` column, optional ``patient`` and ``frame``), one NIfTI file,
    or a glob pattern."""
    p = Path(input).expanduser()
    scans: list[Scan] = []
    if p.is_dir() and not any(p.glob("*/Info.cfg")):
        from fcl_lightning.data.folders import MANIFEST_NAMES

        listed = [p / n for n in MANIFEST_NAMES if (p / n).is_file()]
        if len(listed) == 1:  # a site folder in the manifest layout: its manifest names patients and frames
            p = listed[0]
    if p.is_dir() and sorted(p.glob("*/Info.cfg")):
        for info_path in sorted(p.glob("*/Info.cfg")):
            patient = info_path.parent.name
            info = read_info_cfg(info_path, patient)
            for frame in ("ED", "ES"):
                stem = f"{patient}_frame{int(info[frame]):02d}"
                scans.append(Scan(info_path.parent / f"{stem}.nii.gz", stem, patient, frame))
    elif p.is_dir():
        paths = sorted(x for x in p.iterdir() if x.is_file() and is_nifti(x) and _not_a_label(x))
        scans = [Scan(x, nifti_stem(x)) for x in paths]
    elif p.is_file() and str(p).endswith(MANIFEST_SUFFIXES):
        from fcl_lightning.data.manifest import ManifestSource

        for r in ManifestSource(str(p)).records():
            if r.image_path is None:
                raise PredictInputError(f"{p}: record {r.key} has no image path")
            scans.append(Scan(Path(r.image_path), nifti_stem(r.image_path), r.patient, r.frame))
    elif p.is_file():
        if not is_nifti(p):
            raise PredictInputError(
                f"predict input {p} is neither a NIfTI image (.nii, .nii.gz) nor a manifest (.csv, .tsv, .json)"
            )
        scans = [Scan(p, nifti_stem(p))]
    else:
        paths = sorted(Path(x) for x in glob.glob(str(p)) if is_nifti(x) and _not_a_label(Path(x)))
        if not paths and not any(ch in input for ch in "*?["):
            raise PredictInputError(f"predict input {input} does not exist")
        scans = [Scan(x, nifti_stem(x)) for x in paths]
    if not scans:
        hint = ""
        if p.is_dir() and any(q.is_dir() for q in p.iterdir()):
            hint = " (a folder of site folders? give one site's folder, or a manifest)"
        raise PredictInputError(f"predict input {input} names no NIfTI image{hint}")
    names: dict[str, Path] = {}
    for s in scans:
        if s.name in names and names[s.name] != s.path:
            raise PredictInputError(
                f"two inputs would write the same {s.name}_seg.nii.gz: {names[s.name]} and {s.path}; "
                "predict them into different output folders"
            )
        names[s.name] = s.path
    return scans


def stored_zooms(path: Path, img: nib.Nifti1Image) -> np.ndarray:
    """The voxel spacing as the file stores it (``pixdim[1:4]``): nibabel's loaded header would
    have turned a missing (0) spacing into 1 mm."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            header = type(img.header).from_fileobj(fh, check=False)
        return np.asarray(header["pixdim"][1:4], dtype=float)
    except Exception:  # a header nibabel read once already: fall back to its zooms
        return np.asarray(img.header.get_zooms()[:3], dtype=float)


def _load_header(path: Path) -> nib.Nifti1Image:
    """The image object without its voxels (nibabel reads them only when asked)."""
    quiet = logging.getLogger("nibabel.global")  # its note on a header it repairs: checked below instead
    was, quiet.disabled = quiet.disabled, True
    try:
        return nib.load(str(path))
    finally:
        quiet.disabled = was


def check_scan(scan: Scan) -> tuple[int, ...]:
    """What the header and the path tell, without decoding the voxels: the file exists and is a
    NIfTI image of 3 or 4 dimensions with a voxel spacing and an invertible affine. Returns its
    shape; one :class:`PredictInputError` naming the file otherwise."""
    path = scan.path
    if not path.is_file():
        raise PredictInputError(f"{path}: image file not found")
    try:
        img = _load_header(path)
        shape = tuple(int(n) for n in img.shape)
        affine = voxel_affine(img)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise PredictInputError(
            f"{path}: cannot read the image: corrupt or not NIfTI ({type(exc).__name__}: {exc})"
        ) from None
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (3, 4):
        raise PredictInputError(f"{path}: not a 3D or 4D image (shape {shape})")
    zooms = stored_zooms(path, img)
    if zooms.size < 3 or not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise PredictInputError(f"{path}: the header gives no voxel spacing (pixdim {zooms.tolist()})")
    det = np.linalg.det(affine[:3, :3])
    if not np.isfinite(det) or abs(det) < 1e-12:
        raise PredictInputError(f"{path}: the header's affine is singular")
    return shape


def read_scan(scan: Scan) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray]:
    """The image, its data as float32 (3D, or 4D with time last) and its voxel affine, or one
    :class:`PredictInputError` naming the file: unreadable, not 3D/4D, no spacing, NaN voxels."""
    check_scan(scan)
    path = scan.path
    try:
        img = _load_header(path)
        data = np.asanyarray(img.dataobj).astype(np.float32)
        affine = voxel_affine(img)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise PredictInputError(
            f"{path}: cannot read the image: corrupt or not NIfTI ({type(exc).__name__}: {exc})"
        ) from None
    while data.ndim > 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if not np.all(np.isfinite(data)):
        raise PredictInputError(f"{path}: holds NaN or infinite voxels")
    return img, data, affine


def check_output_folder(out: Path, scans: list[Scan]) -> None:
    """The output folder is writable and holds none of the inputs (a prediction never lands
    beside, or over, the images it came from)."""
    out = out.expanduser().resolve()
    for s in scans:
        if s.path.expanduser().resolve().parent == out:
            raise PredictInputError(
                f"the output folder {out} is the folder of the input {s.path}: choose another --output"
            )
    check_writable(out, "the output folder", "--output")
    ours = {f"{s.name}_seg.nii.gz" for s in scans}
    others = sorted(p.name for p in out.glob("*_seg.nii.gz") if p.name not in ours) if out.is_dir() else []
    if others:
        raise PredictInputError(
            f"the output folder {out} holds {len(others)} label map(s) of other inputs ({others[0]}, ...): its "
            "volumes.csv and indices.csv would not cover them; choose another --output or empty it"
        )


def preprocess_traced(pre: Preprocessor, image: np.ndarray, affine: np.ndarray, class_maps: np.ndarray | None = None):
    """The pipeline and its output for one 3D frame: MetaTensors that remember every transform
    applied (what :func:`to_native` inverts). ``class_maps`` ``[C, X, Y, Z]`` (one-hot of a label
    map) go along as ``label``, resampled linearly as probabilities would be."""
    t = pre.pipeline(affine, label_mode="bilinear")
    aff = torch.as_tensor(affine, dtype=torch.float64)
    data: dict[str, Any] = {"image": MetaTensor(torch.from_numpy(np.ascontiguousarray(image[None])), affine=aff)}
    if class_maps is not None:
        data["label"] = MetaTensor(torch.from_numpy(class_maps.astype(np.float32)), affine=aff.clone())
    return t, t(data)


def to_native(t: Any, image: MetaTensor, probs: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Per-class maps ``[C, S, S, D]`` on the preprocessed grid of ``image`` back onto the scan's
    own grid (``Invertd``: every invertible transform of ``t`` undone, linear interpolation)."""
    pred = MetaTensor(probs, affine=image.affine, applied_operations=image.applied_operations)
    back = Invertd("pred", transform=t, orig_keys="image", nearest_interp=False)({"pred": pred, "image": image})["pred"]
    out = back.as_tensor().float()
    if tuple(out.shape[1:]) != tuple(shape):
        raise RuntimeError(f"inverse preprocessing gave shape {tuple(out.shape[1:])}, not {tuple(shape)}")
    return out


def segment_frame(
    net: torch.nn.Module, pre: Preprocessor, image: np.ndarray, affine: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Label map (uint8) and class probabilities ``[C, X, Y, Z]`` of one 3D frame, on its own grid."""
    from fcl_lightning.evaluation import predict_probabilities

    t, data = preprocess_traced(pre, image, affine)
    x = data["image"]
    probs = to_native(t, x, predict_probabilities(net, x.as_tensor().float(), batch_size), image.shape)
    return probs.argmax(0).to(torch.uint8).numpy(), probs.numpy()


def save_label_map(seg: np.ndarray, like: nib.Nifti1Image, path: Path) -> Path:
    """``seg`` as a uint8 NIfTI with ``like``'s header geometry (affine, sform/qform, zooms),
    written atomically (a temp file beside it, then a rename)."""
    header = like.header.copy()
    out = nib.Nifti1Image(seg.astype(np.uint8), like.affine, header)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1.0, 0.0)
    out.header["cal_min"], out.header["cal_max"] = 0, max(int(seg.max()), 1)
    raw = out.to_bytes()
    body = gzip.compress(raw, compresslevel=1, mtime=0) if str(path).endswith(".gz") else raw
    return atomic_write(path, lambda tmp: tmp.write_bytes(body))


def save_probabilities(probs: np.ndarray, like: nib.Nifti1Image, path: Path) -> Path:
    """Class probabilities, classes on a trailing axis: ``[X, Y, Z, C]`` (``[X, Y, Z, T, C]`` for a cine)."""
    header = like.header.copy()
    out = nib.Nifti1Image(np.moveaxis(probs, 0, -1).astype(np.float32), like.affine, header)
    out.set_data_dtype(np.float32)
    out.header.set_slope_inter(1.0, 0.0)
    body = gzip.compress(out.to_bytes(), compresslevel=1, mtime=0)
    return atomic_write(path, lambda tmp: tmp.write_bytes(body))


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def missing_indices(scans: list[tuple[Scan, int]]) -> list[str]:
    """Why patients or inputs get no cardiac indices, one line each (empty when every input counts
    toward a patient's indices). ``scans``: each input with its number of dimensions (3: one frame,
    4: a cine, which gives volumes per frame but no indices)."""
    framed: dict[str, dict[str, int]] = {}
    other: list[Scan] = []
    for scan, ndim in scans:
        if scan.patient and scan.frame in INDEX_FRAMES:
            framed.setdefault(scan.patient, {})[scan.frame] = ndim
        else:
            other.append(scan)
    if not framed:
        given = sorted({str(s.frame) for s in other if s.frame})
        note = f"; the frames given ({_first([repr(g) for g in given])}) are not 'ED' / 'ES'" if given else ""
        return [NO_FRAMES_REASON + note]
    reasons = []
    for patient, frames in sorted(framed.items()):
        if len(frames) == 1:
            (have,) = frames
            reasons.append(f"{patient}: only {have}, no {'ES' if have == 'ED' else 'ED'} frame: no indices")
            continue
        cines = [f for f in INDEX_FRAMES if frames[f] != 3]
        if cines:
            what = " and ".join(cines) + (" images are 4D cines" if len(cines) > 1 else " image is a 4D cine")
            reasons.append(f"{patient}: the {what}, not one 3D frame: no indices")
    if other:
        names = _first([s.name for s in other])
        verb = "inputs name" if len(other) > 1 else "input names"
        reasons.append(f"{len(other)} {verb} no patient's ED or ES frame ({names}): no indices from them")
    return reasons


#: what ``predict`` does with a scan whose header passed but whose voxels fail to decode
ON_BAD_SCAN = ("stop", "skip")


def segment_scan(
    net: torch.nn.Module,
    pre: Preprocessor,
    scan: Scan,
    img: Any,
    data: np.ndarray,
    affine: np.ndarray,
    out: Path,
    batch_size: int,
    probabilities: bool,
    written: list[Path],
) -> np.ndarray:
    """Segment one decoded 3D or 4D scan frame by frame and write its label map (and its
    probabilities) on the scan's grid, appending the files to ``written``; the label map."""
    frames = [data] if data.ndim == 3 else [data[..., t] for t in range(data.shape[3])]
    segs, probs = zip(*(segment_frame(net, pre, f, affine, batch_size) for f in frames))
    seg = segs[0] if data.ndim == 3 else np.stack(segs, axis=-1)
    written.append(save_label_map(seg, img, out / f"{scan.name}_seg.nii.gz"))
    if probabilities:
        p = probs[0] if data.ndim == 3 else np.stack(probs, axis=-1)
        written.append(save_probabilities(p, img, out / f"{scan.name}_prob.nii.gz"))
    return seg


def predict_scans(
    net: torch.nn.Module,
    pre: Preprocessor,
    scans: list[Scan],
    out: Path,
    batch_size: int = 32,
    probabilities: bool = False,
    progress: Callable[[int, Scan], None] | None = None,
    on_bad_scan: str = "stop",
) -> dict[str, Any]:
    """Segment every scan into ``out``; returns the files written (``files``), the rows of the CSVs
    (``volumes``, ``indices``), why patients or inputs have no indices (``no_indices``: lines of
    :func:`missing_indices`) and the scans that failed to decode (``bad``).

    What headers and paths tell is checked for every input before anything is written (one bad
    header stops the command with nothing written); then the scans are decoded, segmented and
    written one at a time, so memory stays flat in the number of inputs. A scan that fails only
    when decoded (damaged data, NaN voxels) stops the run (``on_bad_scan: stop``, after writing
    the CSVs of what was done) or is skipped (``skip``); ``volumes.csv``'s ``status`` says which.
    ``volumes.csv`` holds the structure volumes of every 3D image, ``indices.csv`` the cardiac
    indices of every patient with an ED and an ES frame, and a ``flags`` column: empty, or the
    implausible indices joined by ``;`` (e.g. ``RV_EDV<10ml;RV_EF<0%``,
    :func:`~fcl_lightning.indices.implausible`)."""
    if on_bad_scan not in ON_BAD_SCAN:
        raise PredictInputError(f"--on_bad_scan must be one of {ON_BAD_SCAN}, got {on_bad_scan!r}")
    shapes = [check_scan(s) for s in scans]
    reasons = missing_indices([(s, len(shape)) for s, shape in zip(scans, shapes)])
    check_output_folder(out, scans)
    written: list[Path] = []
    volume_rows: list[dict[str, Any]] = []
    index_rows: list[dict[str, Any]] = []
    bad: list[str] = []
    # the ED / ES label maps of patients still waiting for their other frame (only those: memory
    # stays flat when a patient's frames come together, as they do in an ACDC root or a manifest)
    waiting: dict[str, dict[str, tuple[np.ndarray, tuple[float, float, float]]]] = {}
    left = Counter(s.patient for s in scans if s.patient and s.frame in INDEX_FRAMES)

    def finish() -> None:
        for row in index_rows:
            row["flags"] = ";".join(implausible(row))
        if volume_rows:
            written.append(write_volumes_csv(volume_rows, out / "volumes.csv"))
        if index_rows:
            written.append(write_indices_csv(sorted(index_rows, key=lambda r: r["patient"]), out / "indices.csv"))

    for i, scan in enumerate(scans):
        if progress is not None:
            progress(i, scan)
        try:
            img, data, affine = read_scan(scan)
        except PredictInputError as exc:
            bad.append(str(exc))
            volume_rows.append(
                {"image": scan.name, "status": f"{'failed' if on_bad_scan == 'stop' else 'skipped'}: {exc}"}
            )
            if on_bad_scan == "stop":
                finish()
                raise PredictInputError(
                    f"{exc} (after {i} of {len(scans)} scans; volumes.csv lists them; --on_bad_scan skip goes on)"
                ) from None
            continue
        seg = segment_scan(net, pre, scan, img, data, affine, out, batch_size, probabilities, written)
        del data
        spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
        if seg.ndim == 3:
            volume_rows.append({"image": scan.name, **structure_volumes_ml(seg, spacing), "status": "ok"})
            if scan.patient and scan.frame in INDEX_FRAMES:
                waiting.setdefault(scan.patient, {})[scan.frame] = (seg, spacing)
        if scan.patient and scan.frame in INDEX_FRAMES:
            left[scan.patient] -= 1
            f = waiting.get(scan.patient, {})
            if "ED" in f and "ES" in f:
                index_rows.append(
                    {"patient": scan.patient, **cardiac_indices(f["ED"][0], f["ES"][0], f["ED"][1], f["ES"][1])}
                )
            if left[scan.patient] == 0:
                waiting.pop(scan.patient, None)
    finish()
    return {"files": written, "volumes": volume_rows, "indices": index_rows, "no_indices": reasons, "bad": bad}


def write_volumes_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["image", "RV", "MYO", "LV", "status"])
            w.writeheader()
            w.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)

    return atomic_write(path, write)


def score_native(
    net: torch.nn.Module, pre: Preprocessor, source: Any, volumes: list, batch_size: int = 32
) -> list[dict]:
    """Score volumes on their scans' own grids: each is read again from ``source``, segmented as
    ``predict`` does (preprocessing, network, ``Invertd`` back) and compared with its original
    label map at the header spacing; the rows of :func:`~fcl_lightning.evaluation.evaluate_volumes`."""
    from fcl_lightning.evaluation import structure_volume_columns, volume_metrics

    rows = []
    for vol in volumes:
        raw = source.load(vol.record)
        if raw.label is None:
            raise ValueError(f"volume {vol.record.key!r} has no label; evaluation needs labelled volumes")
        seg, _ = segment_frame(net, pre, raw.image, raw.affine, batch_size)
        spacing = tuple(float(x) for x in np.linalg.norm(np.asarray(raw.affine)[:3, :3], axis=0))
        label = raw.label.astype(np.uint8)
        rec = vol.record
        row: dict = {"key": rec.key, "patient": rec.patient, "frame": rec.frame, "group": rec.group, "site": rec.site}
        row.update(volume_metrics(torch.from_numpy(seg), torch.from_numpy(label), spacing))
        row.update(structure_volume_columns(seg, label, spacing))
        rows.append(row)
    return rows
