"""Preprocessor: output contract, orientation, memory and disk caches, no partial cache entries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fcl_lightning.data.acdc import ACDCSource
from fcl_lightning.data.phantom import PhantomSource
from fcl_lightning.data.preprocess import Preprocessor, clear_memory_cache, load_volumes, positive_axcodes
from fcl_lightning.data.volume import DataError, RawVolume, VolumeRecord, VolumeSource
from fcl_lightning.io import WriteError


class CountingSource(VolumeSource):
    """Wraps a source and counts ``load`` calls."""

    def __init__(self, inner: VolumeSource) -> None:
        self.inner, self.loads = inner, 0

    def records(self) -> list[VolumeRecord]:
        return self.inner.records()

    def load(self, record: VolumeRecord) -> RawVolume:
        self.loads += 1
        return self.inner.load(record)

    def fingerprint(self, record: VolumeRecord) -> str:
        return self.inner.fingerprint(record)


class ArraySource(VolumeSource):
    """One in-memory volume with a chosen affine."""

    def __init__(self, raw: RawVolume) -> None:
        self.raw = raw

    def records(self) -> list[VolumeRecord]:
        return [VolumeRecord(key="vol", patient="vol")]

    def load(self, record: VolumeRecord) -> RawVolume:
        return self.raw


def test_output_contract(small_phantom: PhantomSource) -> None:
    pre = Preprocessor(spacing=1.367, size=80)
    recs = small_phantom.records()
    vols = load_volumes(small_phantom, recs, pre)
    assert [v.record for v in vols] == recs
    for v in vols:
        raw = small_phantom.load(v.record)
        d = raw.image.shape[2]
        assert v.image.shape == (1, 80, 80, d) and v.image.dtype == torch.float32
        assert v.label.shape == (1, 80, 80, d) and v.label.dtype == torch.uint8
        assert v.num_slices == d
        assert float(v.image.min()) >= 0.0 and float(v.image.max()) == pytest.approx(1.0)
        assert set(torch.unique(v.label).tolist()) <= {0, 1, 2, 3}
        assert v.spacing == pytest.approx((1.367, 1.367, float(np.linalg.norm(raw.affine[:3, 2]))))
        assert v.meta["original_shape"] == raw.image.shape
        # each slice keeps its content: label presence per slice matches the raw volume
        raw_fg = (raw.label > 0).reshape(-1, d).any(0)
        assert np.array_equal(raw_fg, (v.label[0] > 0).reshape(-1, d).any(0).numpy())


def test_keep_spacing_and_no_label() -> None:
    rng = np.random.default_rng(0)
    raw = RawVolume(image=rng.random((40, 50, 5), dtype=np.float32), affine=np.diag([2.0, 2.0, 8.0, 1.0]))
    src = ArraySource(raw)
    vol = Preprocessor(spacing=0, size=48)(src, src.records()[0])
    assert vol.label is None
    assert vol.spacing == pytest.approx((2.0, 2.0, 8.0))
    assert vol.image.shape == (1, 48, 48, 5)


def test_oblique_axes_keep_slice_axis_last() -> None:
    """Voxel axis 0 along world A, axis 1 along world L: flipped, never permuted."""
    affine = np.array([[0, -1.5, 0, 0], [1.5, 0, 0, 0], [0, 0, 10, 0], [0, 0, 0, 1]], dtype=float)
    assert positive_axcodes(affine) == "ARS"
    label = np.zeros((30, 40, 7), dtype=np.uint8)
    label[5:10, 5:10, 2] = 3
    image = np.random.default_rng(0).random(label.shape, dtype=np.float32) + label
    raw = RawVolume(image=image, affine=affine, label=label)
    src = ArraySource(raw)
    vol = Preprocessor(spacing=1.5, size=64)(src, src.records()[0])
    assert vol.image.shape == (1, 64, 64, 7)
    assert vol.spacing == pytest.approx((1.5, 1.5, 10.0))
    assert int((vol.label == 3).sum()) == 25 and bool((vol.label[0, :, :, 2] == 3).any())


@pytest.fixture(autouse=True)
def fresh_memory_cache():
    """The memory cache is shared by the process: each test here starts from an empty one."""
    clear_memory_cache()
    yield
    clear_memory_cache()


def test_memory_cache(small_phantom: PhantomSource) -> None:
    src = CountingSource(small_phantom)
    pre = Preprocessor(size=64)
    rec = src.records()[0]
    a, b = pre(src, rec), pre(src, rec)
    assert src.loads == 1 and a.image is b.image
    Preprocessor(size=72)(src, rec)  # other parameters: other cache entry
    assert src.loads == 2
    pre(src, src.records()[1])
    assert src.loads == 3


def test_disk_cache(small_phantom: PhantomSource, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    src = CountingSource(small_phantom)
    recs = src.records()[:2]
    first = load_volumes(src, recs, Preprocessor(size=64, cache_dir=str(cache)))
    assert src.loads == 2
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and all(f.endswith(".pt") and not f.startswith(".") for f in files)
    assert load_volumes(src, recs, Preprocessor(size=64))[0].image is first[0].image  # shared in memory
    clear_memory_cache()  # a new process
    second = load_volumes(src, recs, Preprocessor(size=64, cache_dir=str(cache)))
    assert src.loads == 2
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.image, b.image) and torch.equal(a.label, b.label)
        assert a.spacing == b.spacing and a.meta == b.meta and b.record == a.record
    # an unreadable entry is recomputed and replaced
    broken = cache / files[0]
    broken.write_bytes(b"garbage")
    clear_memory_cache()
    load_volumes(src, recs, Preprocessor(size=64, cache_dir=str(cache)))
    assert src.loads == 3 and broken.stat().st_size > 100


def test_failed_load_leaves_no_cache_file(acdc_root: Path, tmp_path: Path) -> None:
    image = acdc_root / "patient001" / "patient001_frame01.nii.gz"
    image.write_bytes(image.read_bytes()[:-300])
    src = ACDCSource(str(acdc_root), patients="1")
    cache = tmp_path / "cache"
    pre = Preprocessor(size=64, cache_dir=str(cache))
    with pytest.raises(DataError, match="patient001_frame01.nii.gz"):
        pre(src, src.records()[0])
    assert not cache.exists() or list(cache.iterdir()) == []


def test_crash_while_writing_leaves_no_cache_file(
    small_phantom: PhantomSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(obj: object, f: object) -> None:
        Path(f).write_bytes(b"partial")  # type: ignore[arg-type]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    cache = tmp_path / "cache"
    with pytest.raises(WriteError, match=r"cannot write .*cache.*\.pt: OSError: disk full"):
        Preprocessor(size=64, cache_dir=str(cache))(small_phantom, small_phantom.records()[0])
    assert list(cache.iterdir()) == []
