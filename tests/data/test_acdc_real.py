"""Opt-in check on the real ACDC training set: set FCL_ACDC_ROOT to the folder holding patient001..100."""

from __future__ import annotations

import collections
import os
import time

import nibabel as nib
import pytest
import torch

from fcl_lightning.data.acdc import ACDCSource
from fcl_lightning.data.preprocess import Preprocessor, load_volumes

ROOT = os.environ.get("FCL_ACDC_ROOT")

pytestmark = pytest.mark.skipif(not ROOT, reason="set FCL_ACDC_ROOT to the ACDC training folder to run")


def test_all_training_patients() -> None:
    start = time.perf_counter()
    src = ACDCSource(str(ROOT), patients="1-100")
    records = src.records()
    assert len(records) == 200
    groups = collections.Counter(r.group for r in records if r.frame == "ED")
    assert groups == {"DCM": 20, "HCM": 20, "MINF": 20, "NOR": 20, "RV": 20}

    vols = load_volumes(src, records, Preprocessor(size=128))
    present: dict[str, set[int]] = collections.defaultdict(set)
    for v in vols:
        d = v.num_slices
        assert v.image.shape == (1, 128, 128, d) and v.label.shape == (1, 128, 128, d), v.record.key
        assert 6 <= d <= 21, v.record.key
        assert v.image.dtype == torch.float32 and v.label.dtype == torch.uint8
        assert 0.0 <= float(v.image.min()) and float(v.image.max()) <= 1.0
        values = set(torch.unique(v.label).tolist())
        assert values <= {0, 1, 2, 3}, v.record.key
        present[v.record.patient] |= values
        assert v.spacing[:2] == pytest.approx((1.367, 1.367), abs=1e-3)
    missing = {p: {0, 1, 2, 3} - s for p, s in present.items() if s != {0, 1, 2, 3}}
    assert not missing, missing
    elapsed = time.perf_counter() - start

    dtypes = collections.Counter(str(nib.load(str(r.image_path)).get_data_dtype()) for r in records)
    slices = collections.Counter(v.num_slices for v in vols)
    spacing = sorted({round(v.meta["original_spacing"][0], 3) for v in vols})
    thickness = collections.Counter(round(v.spacing[2], 2) for v in vols)
    print(
        f"\nACDC: {len(vols)} volumes in {elapsed:.1f} s; stored dtypes {dict(dtypes)}; "
        f"slices per volume {dict(sorted(slices.items()))}; in-plane {spacing[0]}-{spacing[-1]} mm; "
        f"slice spacing {dict(sorted(thickness.items()))}"
    )
