"""ACDC (MICCAI 2017) reader: ``patientXXX`` folders with ED/ES frames, ``_gt`` labels and ``Info.cfg``."""

from __future__ import annotations

from pathlib import Path

from fcl_lightning.data.nifti import read_nifti_pair
from fcl_lightning.data.split import parse_id_range
from fcl_lightning.data.volume import DataError, RawVolume, VolumeRecord, VolumeSource

__all__ = ["ACDCSource", "parse_id_range", "read_info_cfg"]

FRAMES = ("ED", "ES")


def read_info_cfg(path: Path, patient: str) -> dict[str, str]:
    """Parse ``Info.cfg`` (``key: value`` lines) and check that ED and ES are positive frame numbers."""
    if not path.is_file():
        raise DataError(f"{patient}: Info.cfg not found: {path}")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"{patient}: cannot read {path}: {e}") from e
    info: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    for frame in FRAMES:
        value = info.get(frame)
        if value is None:
            raise DataError(f"{patient}: {path} has no '{frame}:' line (needs ED and ES frame numbers)")
        try:
            number = int(float(value))
        except (ValueError, OverflowError):
            raise DataError(f"{patient}: {path}: {frame} frame {value!r} is not a number") from None
        if number < 1 or number != float(value):
            raise DataError(f"{patient}: {path}: {frame} frame {value!r} is not a positive integer")
        info[frame] = str(number)
    return info


class ACDCSource(VolumeSource):
    """Folders in the ACDC layout: one record per selected patient and frame.

    Each ``<patient>/`` folder holds ``Info.cfg`` (``ED:`` and ``ES:`` frame numbers),
    ``<patient>_frameNN.nii.gz`` images and, for labelled frames, ``<patient>_frameNN_gt.nii.gz``
    labels. A frame without its ``_gt`` file is an unlabelled scan (pre-training and
    semi-supervised fine-tuning use it; supervised fine-tuning, validation and test do not).

    Args:
        root: folder holding the patient folders (e.g. ``.../ACDC/training``).
        patients: ``"all"`` (every sub-folder with an ``Info.cfg``) or patient numbers of
            ``patientNNN`` folders, e.g. ``"1-100"``, ``"1-20,41-60"``, ``"5"``.
        frames: which frames to list, a subset of ``("ED", "ES")``.

    ``records()`` checks every selected folder, ``Info.cfg`` and image file exists (fail before
    training); ``load()`` reads and validates file content.
    """

    def __init__(self, root: str = "", patients: str = "all", frames: tuple[str, ...] = FRAMES) -> None:
        self.root = Path(root).expanduser() if str(root) else None
        self.patients = str(patients).strip()
        self.patient_ids = None if self.patients.lower() == "all" else parse_id_range(patients)
        frames = tuple(frames)
        bad = [f for f in frames if f not in FRAMES]
        if bad or not frames or len(set(frames)) != len(frames):
            raise DataError(f"ACDC frames must be distinct values from {FRAMES}, got {frames}")
        self.frames = frames
        self._records: list[VolumeRecord] | None = None

    def records(self) -> list[VolumeRecord]:
        if self._records is None:
            self._records = self._scan()
        return list(self._records)

    def patient_folders(self) -> list[Path]:
        """The selected patient folders, in order (``"all"``: every sub-folder holding ``Info.cfg``)."""
        if self.root is None:
            raise DataError("ACDC root not set: pass --data.root PATH (the folder holding patientXXX folders)")
        if not self.root.is_dir():
            raise DataError(f"ACDC root folder not found: {self.root}")
        if self.patient_ids is None:
            folders = sorted(p.parent for p in self.root.glob("*/Info.cfg"))
            if not folders:
                raise DataError(f"{self.root} holds no patient folder with an Info.cfg (ACDC layout)")
            stray = sorted(
                q.name for q in self.root.iterdir() if q.is_dir() and q not in folders and any(q.glob("*.nii*"))
            )
            if stray:
                raise DataError(
                    f"{self.root / stray[0]}: Info.cfg not found ({len(stray)} of the ACDC-layout folder's patient "
                    "folders lack one; each needs its ED: and ES: frame numbers)"
                )
            return folders
        folders = []
        for pid in self.patient_ids:
            folder = self.root / f"patient{pid:03d}"
            if not folder.is_dir():
                raise DataError(f"{folder.name}: patient folder missing from ACDC root {self.root}")
            folders.append(folder)
        return folders

    def _scan(self) -> list[VolumeRecord]:
        out: list[VolumeRecord] = []
        for folder in self.patient_folders():
            patient = folder.name
            info = read_info_cfg(folder / "Info.cfg", patient)
            for frame in self.frames:
                stem = f"{patient}_frame{int(info[frame]):02d}"
                image, label = folder / f"{stem}.nii.gz", folder / f"{stem}_gt.nii.gz"
                if not image.is_file():
                    raise DataError(
                        f"{patient}: {frame} image file not found: {image} (Info.cfg {frame}: {info[frame]})"
                    )
                labelled = label.is_file()
                out.append(
                    VolumeRecord(
                        key=f"{patient}_{frame}",
                        patient=patient,
                        image_path=image,
                        label_path=label if labelled else None,
                        frame=frame,
                        group=info.get("Group") or None,
                        labelled=labelled,
                    )
                )
        return out

    def load(self, record: VolumeRecord) -> RawVolume:
        if record.image_path is None:
            raise DataError(f"{record.key}: record has no image path")
        return read_nifti_pair(record.image_path, record.label_path, record.key)
