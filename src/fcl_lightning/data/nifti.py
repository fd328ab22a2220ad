"""Reading and validating NIfTI image/label pairs, shared by the ACDC and manifest sources."""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from fcl_lightning.data.volume import LABELS, DataError, RawVolume

#: Errors that a missing, truncated or corrupt file raises inside nibabel/gzip.
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError)

_VALID_LABELS = np.array(sorted(LABELS), dtype=np.int64)


def nifti_stem(path: str | Path) -> str:
    """File name without ``.nii.gz`` / ``.nii`` (``patient001_frame01.nii.gz`` -> ``patient001_frame01``)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def voxel_affine(img: nib.Nifti1Image) -> np.ndarray:
    """The voxel -> world affine with the voxel size taken from ``pixdim``, as ITK does.

    ACDC files carry an sform of pure directions (``diag(-1, -1, 1)``, column norms 1 mm) while the real
    spacing (e.g. 1.5625 x 1.5625 x 10 mm) only sits in ``pixdim``. ``nibabel``'s ``img.affine`` would
    make every ACDC volume look 1 mm isotropic, so the columns are rescaled to ``pixdim`` whenever the
    two disagree; consistent files are returned unchanged.
    """
    affine = np.asarray(img.affine, dtype=np.float64).copy()
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    if zooms.size == 3 and np.all(zooms > 0) and np.all(norms > 0) and not np.allclose(norms, zooms, rtol=1e-3):
        affine[:3, :3] = affine[:3, :3] / norms * zooms
    return affine


def _read(path: Path, name: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one NIfTI file fully: (data as stored, after scl_slope), voxel affine."""
    if not path.is_file():
        raise DataError(f"{name}: {what} file not found: {path}")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        affine = voxel_affine(img)
    except _READ_ERRORS as e:
        raise DataError(f"{name}: cannot read {what} {path}: corrupt or not NIfTI ({type(e).__name__}: {e})") from e
    # Tolerate trailing singleton axes ([H, W, D, 1]); anything else than 3D is an error.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{name}: {what} {path} is not a 3D volume (shape {tuple(data.shape)})")
    if not np.isfinite(np.linalg.det(affine[:3, :3])) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{name}: {what} {path} has a singular affine")
    return data, affine


def read_nifti_pair(image_path: str | Path, label_path: str | Path | None, name: str) -> RawVolume:
    """Read an image (any stored dtype -> float32) and optional label (-> uint8) and validate them.

    Raises a single :class:`DataError` naming ``name`` and the file when a file is missing or corrupt,
    a volume is not 3D, the image holds NaN/inf, the label's shape or affine differs from the image's,
    or the label holds values outside the ACDC convention {0, 1, 2, 3}.
    """
    image_path = Path(image_path)
    data, affine = _read(image_path, name, "image")
    image = data.astype(np.float32, copy=False)
    if not np.all(np.isfinite(image)):
        raise DataError(f"{name}: image {image_path} contains NaN or infinite values")

    label: np.ndarray | None = None
    if label_path is not None:
        label_path = Path(label_path)
        lab, lab_affine = _read(label_path, name, "label")
        if lab.shape != image.shape:
            raise DataError(
                f"{name}: label {label_path} has shape {tuple(lab.shape)} but image {image_path} "
                f"has shape {tuple(image.shape)}"
            )
        if not np.allclose(lab_affine, affine, atol=1e-3):
            raise DataError(
                f"{name}: label {label_path} and image {image_path} have different affines "
                f"(label {np.round(lab_affine, 3).tolist()} vs image {np.round(affine, 3).tolist()})"
            )
        values = np.unique(lab)
        bad = values[~np.isin(values, _VALID_LABELS)]
        if bad.size:
            shown = ", ".join(f"{v:g}" for v in bad[:10].tolist())
            raise DataError(
                f"{name}: label {label_path} has values {{{shown}}} outside {{0, 1, 2, 3}} "
                f"(expected 0 background, 1 RV, 2 myocardium, 3 LV)"
            )
        label = lab.astype(np.uint8, copy=False)
    return RawVolume(image=np.ascontiguousarray(image), affine=affine, label=label)
