"""Preprocessing with MONAI transforms: orient, resample in-plane, normalise, pad/crop; cached in memory and on disk."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import (
    Compose,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from fcl_lightning.data.volume import DataError, RawVolume, Volume, VolumeRecord, VolumeSource
from fcl_lightning.io import atomic_save

#: Bump when the pipeline changes, so that stale on-disk cache entries are not reused.
PREPROCESS_VERSION = 1

#: (image [1, S, S, D] float32, label [1, S, S, D] uint8 or None, spacing in mm, meta): one cache entry.
Entry = tuple[torch.Tensor, torch.Tensor | None, tuple[float, float, float], dict]

_POSITIVE = {"L": "R", "R": "R", "P": "A", "A": "A", "I": "S", "S": "S"}


def positive_axcodes(affine: np.ndarray) -> str:
    """Orientation that flips axes to point R/A/S but never permutes them.

    Full RAS reorientation could move the slice axis of an oblique acquisition away from the last
    position; flipping only keeps the slice axis last while making every volume's axes point the same way
    (ACDC's LPS-like ``diag(-1, -1, 1)`` becomes RAS).
    """
    return "".join(_POSITIVE[c] for c in nib.aff2axcodes(affine))


#: bytes of preprocessed tensors the process keeps in memory (least recently used ones go first)
MEMORY_CACHE_BYTES = 2 * 2**30


class _MemoryCache:
    """Preprocessed volumes by cache key, least recently used evicted beyond ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.nbytes = max_bytes, 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()

    @staticmethod
    def _size(entry: Entry) -> int:
        return sum(t.numel() * t.element_size() for t in entry[:2] if t is not None)

    def get(self, key: str) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def __setitem__(self, key: str, entry: Entry) -> None:
        if key in self._entries:
            self.nbytes -= self._size(self._entries.pop(key))
        self._entries[key] = entry
        self.nbytes += self._size(entry)
        while self.nbytes > self.max_bytes and len(self._entries) > 1:
            self.nbytes -= self._size(self._entries.popitem(last=False)[1])

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


_MEMORY = _MemoryCache(MEMORY_CACHE_BYTES)


def clear_memory_cache() -> None:
    """Forget every preprocessed volume this process keeps in memory."""
    _MEMORY.clear()


class Preprocessor:
    """Turn a source's :class:`RawVolume` into a training-ready :class:`Volume`.

    Pipeline (MONAI dictionary transforms on channel-first MetaTensors): ``Orientationd`` (flip to R/A/S,
    slice axis stays last), ``Spacingd`` to ``(spacing, spacing, original slice spacing)`` (bilinear for the
    image, nearest for the label; ``spacing <= 0`` keeps the original in-plane spacing),
    ``ScaleIntensityRangePercentilesd`` (clip to the percentiles, scale to [0, 1]) and
    ``ResizeWithPadOrCropd`` to ``(size, size, all slices)``.

    Results are cached in memory by ``source.fingerprint(record)`` + parameters (shared by every
    preprocessor of the process, up to :data:`MEMORY_CACHE_BYTES`: runs one after another in one
    process, such as the experiments runner's cells, preprocess once) and, with ``cache_dir``, on
    disk (written to a temporary file then renamed, so an interrupted or failed run never leaves a partial
    entry). Cached tensors are shared between calls: treat them as read-only.
    """

    def __init__(
        self,
        spacing: float = 1.367,
        size: int = 128,
        lower_percentile: float = 1.0,
        upper_percentile: float = 99.0,
        cache_dir: str | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not 0.0 <= lower_percentile < upper_percentile <= 100.0:
            raise ValueError(
                f"need 0 <= lower_percentile < upper_percentile <= 100, got {lower_percentile}, {upper_percentile}"
            )
        self.spacing = float(spacing)
        self.size = int(size)
        self.lower_percentile = float(lower_percentile)
        self.upper_percentile = float(upper_percentile)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self._memory = _MEMORY

    def params(self) -> str:
        return (
            f"v{PREPROCESS_VERSION}:spacing={self.spacing}:size={self.size}:"
            f"pct={self.lower_percentile}-{self.upper_percentile}"
        )

    def cache_key(self, source: VolumeSource, record: VolumeRecord) -> str:
        text = f"{type(source).__module__}.{type(source).__qualname__}|{source.fingerprint(record)}|{self.params()}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def __call__(self, source: VolumeSource, record: VolumeRecord) -> Volume:
        key = self.cache_key(source, record)
        entry = self._memory.get(key)
        if entry is None:
            entry = self._load_disk(key)
            if entry is None:
                entry = self.apply(checked_image(source.load(record), record))
                if not torch.isfinite(entry[0]).all():
                    raise DataError(
                        f"{record.key}: image {record.image_path or ''} is NaN or infinite after preprocessing "
                        "(its intensity normalisation divided by zero)"
                    )
                self._save_disk(key, entry)
            self._memory[key] = entry
        image, label, spacing, meta = entry
        return Volume(record=record, image=image, label=label, spacing=spacing, meta=dict(meta))

    def pipeline(self, affine: np.ndarray, label_mode: str = "nearest") -> Compose:
        """The whole pipeline for a volume of this ``affine`` (MONAI dictionary transforms on
        ``image`` and, if present, ``label``): what :meth:`apply` runs, and what ``predict``
        inverts (``Invertd``) to bring a prediction back onto the scan's own grid.
        ``label_mode="bilinear"`` resamples a ``label`` of per-class maps (one-hot, probabilities)."""
        pixdim = (self.spacing, self.spacing, -1.0)  # non-positive: keep the original slice spacing
        return Compose(
            [
                Orientationd(
                    ("image", "label"), axcodes=positive_axcodes(affine), labels=None, allow_missing_keys=True
                ),
                Spacingd(
                    ("image", "label"),
                    pixdim=pixdim,
                    mode=("bilinear", label_mode),
                    dtype=np.float32,
                    allow_missing_keys=True,
                ),
                ScaleIntensityRangePercentilesd(
                    "image", lower=self.lower_percentile, upper=self.upper_percentile, b_min=0.0, b_max=1.0, clip=True
                ),
                ResizeWithPadOrCropd(
                    ("image", "label"), spatial_size=(self.size, self.size, -1), allow_missing_keys=True
                ),
            ]
        )

    def apply(self, raw: RawVolume) -> Entry:
        """Run the pipeline on one raw volume (no caching)."""
        affine = torch.as_tensor(raw.affine, dtype=torch.float64)
        image_np = raw.image[None].astype(np.float32)
        data: dict[str, Any] = {"image": MetaTensor(torch.from_numpy(image_np), affine=affine)}
        if raw.label is not None:
            data["label"] = MetaTensor(torch.from_numpy(raw.label[None].astype(np.float32)), affine=affine.clone())
        data = self.pipeline(raw.affine)(data)
        image_mt: MetaTensor = data["image"]
        sx, sy, sz = (float(s) for s in affine_to_spacing(image_mt.affine, 3))
        image = image_mt.as_tensor().to(torch.float32).contiguous()
        label = None
        if "label" in data:
            label = data["label"].as_tensor().round().clamp_(0, 255).to(torch.uint8).contiguous()
        meta = {
            "original_shape": tuple(int(s) for s in raw.image.shape),
            "original_spacing": tuple(float(s) for s in np.linalg.norm(raw.affine[:3, :3], axis=0)),
            "affine": image_mt.affine.tolist(),
        }
        return image, label, (sx, sy, sz), meta

    # -- disk cache --------------------------------------------------------------------------------

    def _path(self, key: str) -> Path | None:
        return self.cache_dir / f"{key}.pt" if self.cache_dir is not None else None

    def _load_disk(self, key: str) -> Entry | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            sx, sy, sz = (float(s) for s in obj["spacing"])
            return obj["image"], obj["label"], (sx, sy, sz), dict(obj["meta"])
        except Exception:  # unreadable entry (e.g. from another torch version): recompute and overwrite
            return None

    def _save_disk(self, key: str, entry: Entry) -> None:
        path = self._path(key)
        if path is None:
            return
        image, label, spacing, meta = entry
        atomic_save({"image": image, "label": label, "spacing": list(spacing), "meta": meta}, path)


def checked_image(raw: RawVolume, record: VolumeRecord) -> RawVolume:
    """``raw``, or one :class:`DataError` naming the volume when its image holds NaN/inf voxels or
    is constant (nothing to normalise, nothing to learn): any source, not only NIfTI files."""
    img = np.asarray(raw.image)
    where = f"{record.key}: image{f' {record.image_path}' if record.image_path else ''}"
    bad = int(np.size(img) - np.count_nonzero(np.isfinite(img)))
    if bad:
        raise DataError(f"{where} holds {bad} NaN or infinite voxels of {np.size(img)}")
    if np.size(img) and float(img.max()) == float(img.min()):
        raise DataError(f"{where} is constant (every voxel {float(img.min()):g}): no intensities to learn from")
    return raw


def load_volumes(source: VolumeSource, records: list[VolumeRecord], preprocessor: Preprocessor) -> list[Volume]:
    """Preprocess ``records`` of ``source`` in order (cached by ``preprocessor``)."""
    return [preprocessor(source, r) for r in records]
