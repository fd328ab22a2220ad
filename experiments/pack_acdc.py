"""Pack ACDC for a remote GPU box: preprocess once (orientation, 1.367 mm in-plane, percentile
normalisation, crop/pad) and write the result back in ACDC layout, 8-bit images, so a small copy
travels and loads through the same ``ACDCSource``.

Re-preprocessing a packed volume is (nearly) the identity: it is already at the target spacing and
size, and a second 1-99 percentile normalisation of a [0, 1] image clipped at its percentiles keeps
it in place. Research use only (ACDC terms): never commit the packed folder.

    python experiments/pack_acdc.py --root /path/to/ACDC/training --out .acdc_pack --size 160
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from fcl_lightning.data.acdc import ACDCSource
from fcl_lightning.data.preprocess import Preprocessor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--spacing", type=float, default=1.367)
    ap.add_argument("--patients", default="1-100")
    args = ap.parse_args()
    src = ACDCSource(args.root, args.patients)
    prep = Preprocessor(spacing=args.spacing, size=args.size)
    out = Path(args.out)
    for rec in src.records():
        vol = prep(src, rec)
        folder = out / rec.patient
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(args.root) / rec.patient / "Info.cfg", folder / "Info.cfg")
        affine = np.diag([*vol.spacing, 1.0])
        img = np.round(vol.image[0].numpy().clip(0, 1) * 255).astype(np.uint8)
        nib.save(nib.Nifti1Image(img, affine), folder / rec.image_path.name)
        nib.save(nib.Nifti1Image(vol.label[0].numpy().astype(np.uint8), affine), folder / rec.label_path.name)
    print(f"packed {len(src.records())} volumes into {out}")


if __name__ == "__main__":
    main()
