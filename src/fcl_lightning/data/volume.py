"""Shared types of the data layer: what a source lists, what it loads, what training sees."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fcl_lightning.errors import UserError

#: ACDC label convention used everywhere in the project.
LABELS: dict[int, str] = {0: "background", 1: "rv", 2: "myo", 3: "lv"}
NUM_CLASSES = len(LABELS)


class DataError(UserError):
    """Bad input data (file, manifest, patient folder). The message names what is wrong and where."""


@dataclass(frozen=True)
class VolumeRecord:
    """One 3D volume a source can load, before anything is read.

    Attributes:
        key: unique id within the source, e.g. ``"patient001_ED"``.
        patient: patient id; splits never separate the volumes of one patient.
        image_path: NIfTI image file (``None`` for generated data such as the phantom).
        label_path: NIfTI label file, if labelled.
        frame: ``"ED"`` / ``"ES"`` or ``None``.
        group: diagnostic group (ACDC: DCM, HCM, MINF, NOR, RV) or ``None``.
        site: client/site id given by the source (manifest column, phantom scanner, site folder), else ``None``.
        labelled: whether the volume has a label (a label file, or a generated one). A label is a
            property of the scan: pre-training uses every volume, supervised fine-tuning, validation
            and test the labelled ones, semi-supervised fine-tuning the unlabelled ones.
    """

    key: str
    patient: str
    image_path: Path | None = None
    label_path: Path | None = None
    frame: str | None = None
    group: str | None = None
    site: int | None = None
    labelled: bool = True


@dataclass
class RawVolume:
    """A volume as read from disk or generated: ``[H, W, D]`` arrays, slice axis last."""

    image: np.ndarray  # float32 [H, W, D]
    affine: np.ndarray  # 4x4 voxel -> world (mm)
    label: np.ndarray | None = None  # uint8 [H, W, D], values in {0, 1, 2, 3}


@dataclass
class Volume:
    """A preprocessed volume, ready for training: channel-first ``[1, H, W, D]`` tensors."""

    record: VolumeRecord
    image: torch.Tensor  # float32 [1, H, W, D]
    label: torch.Tensor | None  # uint8 [1, H, W, D]
    spacing: tuple[float, float, float]  # mm, after preprocessing
    meta: dict = field(default_factory=dict)

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[-1])


class VolumeSource(ABC):
    """A plug-in data source. Subclass it and select it with ``class_path`` in ``data.source``."""

    @abstractmethod
    def records(self) -> list[VolumeRecord]:
        """All volumes this source holds, in a stable order."""

    @abstractmethod
    def load(self, record: VolumeRecord) -> RawVolume:
        """Read one volume. Raise :class:`DataError` naming the file/patient on bad input."""

    def fingerprint(self, record: VolumeRecord) -> str:
        """A string that changes when the record's content changes (used as a cache key)."""
        parts = [record.key]
        for p in (record.image_path, record.label_path):
            if p is not None:
                st = Path(p).stat()
                parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
        return "|".join(parts)
