"""A site is a folder: one site's scans in any supported layout, and a consortium as site folders.

A hospital's folder holds many scans and labels for a few; a scan with a label file is labelled,
one without is not. :class:`FolderSource` reads one such folder whatever its layout (what a
Flower node's ``data-root`` names); :class:`SiteFolders` puts several of them side by side on one
machine, one client each (``data.split: site``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fcl_lightning.data.acdc import ACDCSource
from fcl_lightning.data.manifest import ManifestSource
from fcl_lightning.data.nifti import nifti_stem, read_nifti_pair
from fcl_lightning.data.volume import DataError, RawVolume, VolumeRecord, VolumeSource

__all__ = ["FolderSource", "NiftiFolderSource", "SiteFolders", "detect_layout"]

Layout = Literal["auto", "acdc", "manifest", "nifti"]
#: the file names a manifest-layout folder's manifest may have (exactly one of them)
MANIFEST_NAMES = ("manifest.csv", "manifest.tsv", "manifest.json")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: the label-file suffixes in common use (ACDC, nnU-Net-style exports, ...): a file ending in one
#: of them beside an image of the same stem is refused as an image
LABEL_SUFFIXES = ("_gt", "_seg", "_label", "_labels", "_mask")


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.endswith(NIFTI_SUFFIXES)


def detect_layout(root: Path) -> Literal["acdc", "manifest", "nifti"]:
    """What a folder holds: ``acdc`` (patient folders with ``Info.cfg``), ``manifest`` (one of
    :data:`MANIFEST_NAMES`), else ``nifti`` (NIfTI files, in the folder or one level down)."""
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    if any(root.glob("*/Info.cfg")):
        return "acdc"
    manifests = [n for n in MANIFEST_NAMES if (root / n).is_file()]
    if len(manifests) > 1:
        raise DataError(f"{root} holds {len(manifests)} manifests ({', '.join(manifests)}); keep one")
    if manifests:
        return "manifest"
    nested = [p.parent.parent.name for p in root.glob("*/*/Info.cfg")] + [
        p.parent.name for n in MANIFEST_NAMES for p in root.glob(f"*/{n}")
    ]
    if nested:
        raise DataError(
            f"{root} looks like a folder of site folders ({', '.join(sorted(set(nested))[:5])} hold scans of their "
            "own): give one site's folder, or read them all with SiteFolders (--data.source=SiteFolders)"
        )
    if any(_is_nifti(p) for p in (*root.iterdir(), *root.glob("*/*"))):
        return "nifti"
    raise DataError(
        f"{root} holds no scans: expected patient folders with an Info.cfg (ACDC layout), a "
        f"{' / '.join(MANIFEST_NAMES)}, or NIfTI images (*.nii.gz, *.nii)"
    )


class NiftiFolderSource(VolumeSource):
    """NIfTI images in a folder, each one volume; a label file beside an image makes it labelled.

    ``<name>.nii.gz`` is an image; ``<name><label_suffix>.nii.gz`` beside it is its label. Images
    directly in ``root`` are a patient each (the file stem); the images in a sub-folder are that
    patient's volumes (the file stem is the frame).

    Args:
        root: the folder.
        label_suffix: what a label file's stem ends with (``_gt`` as in ACDC; ``_seg``, ...).
    """

    def __init__(self, root: str = "", label_suffix: str = "_gt") -> None:
        if not label_suffix:
            raise DataError("label_suffix must not be empty (e.g. '_gt')")
        self.root = Path(root).expanduser() if str(root) else None
        self.label_suffix = label_suffix
        self._records: list[VolumeRecord] | None = None

    def records(self) -> list[VolumeRecord]:
        if self._records is None:
            self._records = self._scan()
        return list(self._records)

    def _scan(self) -> list[VolumeRecord]:
        if self.root is None:
            raise DataError("NIfTI folder not set: pass --data.root PATH")
        if not self.root.is_dir():
            raise DataError(f"NIfTI folder not found: {self.root}")
        files = sorted(p for p in (*self.root.iterdir(), *self.root.glob("*/*")) if _is_nifti(p))
        labels = {p for p in files if nifti_stem(p).endswith(self.label_suffix)}
        images = [p for p in files if p not in labels]
        stems = {(p.parent, nifti_stem(p)) for p in images}
        for p in images:  # a label map under another suffix would be read as an image
            for suffix in LABEL_SUFFIXES:
                if nifti_stem(p).endswith(suffix) and (p.parent, nifti_stem(p)[: -len(suffix)]) in stems:
                    raise DataError(
                        f"{p} looks like the label map of {nifti_stem(p)[: -len(suffix)]} (it ends in {suffix!r}, "
                        f"and label files here end in {self.label_suffix!r}): set label_suffix: {suffix}"
                    )
        for lab in sorted(labels):
            stem = nifti_stem(lab)[: -len(self.label_suffix)]
            if not any(nifti_stem(p) == stem and p.parent == lab.parent for p in images):
                raise DataError(f"label {lab} has no image {stem}.nii.gz beside it")
        if not images:
            raise DataError(f"{self.root} holds no NIfTI image (only labels ending in {self.label_suffix!r})")
        out = []
        for image in images:
            stem = nifti_stem(image)
            label = next(
                (lab for lab in labels if lab.parent == image.parent and nifti_stem(lab) == stem + self.label_suffix),
                None,
            )
            nested = image.parent != self.root
            patient = image.parent.name if nested else stem
            out.append(
                VolumeRecord(
                    key=f"{patient}/{stem}" if nested else stem,
                    patient=patient,
                    image_path=image,
                    label_path=label,
                    frame=stem if nested else None,
                    labelled=label is not None,
                )
            )
        return out

    def load(self, record: VolumeRecord) -> RawVolume:
        if record.image_path is None:
            raise DataError(f"{record.key}: record has no image path")
        return read_nifti_pair(record.image_path, record.label_path, record.key)


class FolderSource(VolumeSource):
    """One site's folder in any supported layout, labelled or not (a Flower node's ``data-root``).

    Args:
        root: the site's folder.
        layout: ``auto`` (detected: patient folders with ``Info.cfg`` are ``acdc``; a
            ``manifest.csv`` / ``.tsv`` / ``.json`` is ``manifest``; else ``nifti``), or one of them.
        label_suffix: ``nifti`` layout: what a label file's stem ends with.
    """

    def __init__(self, root: str = "", layout: Layout = "auto", label_suffix: str = "_gt") -> None:
        if layout not in ("auto", "acdc", "manifest", "nifti"):
            raise DataError(f"layout must be auto, acdc, manifest or nifti, got {layout!r}")
        self.root = Path(root).expanduser() if str(root) else None
        self.layout, self.label_suffix = layout, label_suffix
        self._records: list[VolumeRecord] | None = None
        self._inner: VolumeSource | None = None

    def inner(self) -> VolumeSource:
        """The source of the folder's layout (built when first needed, again after ``root`` changes)."""
        if self._inner is None or self._records is None:
            if self.root is None:
                raise DataError("site folder not set: pass --data.root PATH")
            layout = detect_layout(self.root) if self.layout == "auto" else self.layout
            if layout == "acdc":
                self._inner = ACDCSource(str(self.root), patients="all")
            elif layout == "manifest":
                found = [self.root / n for n in MANIFEST_NAMES if (self.root / n).is_file()]
                if not found:
                    raise DataError(f"{self.root} holds no {' / '.join(MANIFEST_NAMES)}")
                self._inner = ManifestSource(str(found[0]))
            else:
                self._inner = NiftiFolderSource(str(self.root), self.label_suffix)
        return self._inner

    def records(self) -> list[VolumeRecord]:
        if self._records is None:
            inner = self.inner()
            self._records = inner.records()
        return list(self._records)

    def load(self, record: VolumeRecord) -> RawVolume:
        return self.inner().load(record)

    def fingerprint(self, record: VolumeRecord) -> str:
        return self.inner().fingerprint(record)


class SiteFolders(VolumeSource):
    """A consortium on one machine: one folder per site, each in any layout :class:`FolderSource`
    reads, with its own orientation and spacing. Site ``i`` (in the order given, or sorted by
    name under ``root``) is client ``i`` with ``data.split: site``; patients are named
    ``<site folder>/<patient>`` so that two sites may both have a ``patient001``.

    Args:
        root: a folder whose sub-folders are the sites (ignored when ``sites`` is given).
        sites: the site folders, in client order.
        layout: as :class:`FolderSource`, for every site.
        label_suffix: as :class:`FolderSource`, for every site.
    """

    def __init__(
        self, root: str = "", sites: list[str] | None = None, layout: Layout = "auto", label_suffix: str = "_gt"
    ) -> None:
        self.root = Path(root).expanduser() if str(root) else None
        self.sites = [str(s) for s in sites] if sites else None
        self.layout, self.label_suffix = layout, label_suffix
        self._records: list[VolumeRecord] | None = None
        self._origin: dict[str, tuple[VolumeSource, VolumeRecord]] = {}

    def site_folders(self) -> list[Path]:
        """The site folders, in client order."""
        if self.sites:
            folders = [Path(s).expanduser() for s in self.sites]
        else:
            if self.root is None:
                raise DataError("SiteFolders needs sites (a list of site folders) or root (a folder of site folders)")
            if not self.root.is_dir():
                raise DataError(f"consortium folder not found: {self.root}")
            if any(self.root.glob("*/Info.cfg")):
                raise DataError(
                    f"{self.root} is one site's ACDC-layout folder (its sub-folders are patients, not sites): "
                    "use FolderSource for it, or list the site folders in sites"
                )
            folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not folders:
                raise DataError(f"{self.root} holds no site folder")
        names = [f.name for f in folders]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DataError(f"two site folders are named {dup[0]!r}: site names must differ")
        for f in folders:
            if not f.is_dir():
                raise DataError(f"site folder not found: {f}")
        return folders

    def records(self) -> list[VolumeRecord]:
        if self._records is None:
            out, origin = [], {}
            for i, folder in enumerate(self.site_folders()):
                src = FolderSource(str(folder), self.layout, self.label_suffix)
                for r in src.records():
                    rec = VolumeRecord(
                        key=f"{folder.name}/{r.key}",
                        patient=f"{folder.name}/{r.patient}",
                        image_path=r.image_path,
                        label_path=r.label_path,
                        frame=r.frame,
                        group=r.group,
                        site=i,
                        labelled=r.labelled,
                    )
                    out.append(rec)
                    origin[rec.key] = (src, r)
            self._records, self._origin = out, origin
        return list(self._records)

    def load(self, record: VolumeRecord) -> RawVolume:
        if record.key not in self._origin:
            self.records()
        src, original = self._origin[record.key]
        return src.load(original)
