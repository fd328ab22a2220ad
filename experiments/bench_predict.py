"""``predict`` on real ACDC volumes: wall time for N patients' ED and ES frames (2N volumes) with a
fine-tuning run's model, and the round trip of the preprocessing (a perfect prediction on the
training grid, brought back onto each scan's grid: its Dice against the original label map).

    python experiments/bench_predict.py --root /path/to/ACDC/training --run <fine-tuning run folder> [--patients 50]

The run folder is one of ``run_tables.py``'s fine-tuning cells (its ``config.yaml`` and
``checkpoints/last.ckpt``). Prints one table (markdown) for experiments/README.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="ACDC training folder")
    ap.add_argument("--run", required=True, help="a fine-tuning run folder (config.yaml, checkpoints/last.ckpt)")
    ap.add_argument("--patients", type=int, default=50, help="patients 1..N: 2N volumes")
    ap.add_argument("--round-trip", type=int, default=20, help="patients for the round trip (0: skip)")
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    from fcl_lightning.cli import main as cli
    from fcl_lightning.data.acdc import read_info_cfg
    from fcl_lightning.data.nifti import read_nifti_pair
    from fcl_lightning.data.preprocess import Preprocessor
    from fcl_lightning.predict import preprocess_traced, to_native

    root, run = Path(args.root), Path(args.run)
    rows = []
    for pid in range(1, args.patients + 1):
        patient = f"patient{pid:03d}"
        info = read_info_cfg(root / patient / "Info.cfg", patient)
        for frame in ("ED", "ES"):
            rows.append(
                {
                    "image": str(root / patient / f"{patient}_frame{int(info[frame]):02d}.nii.gz"),
                    "patient": patient,
                    "frame": frame,
                }
            )
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "scans.csv"
        with open(manifest, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["image", "patient", "frame"])
            w.writeheader()
            w.writerows(rows)
        t0 = time.perf_counter()
        cli(["predict", "--config", str(run / "config.yaml"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
             f"--input={manifest}", f"--output={Path(tmp) / 'out'}", "--trainer.accelerator=cpu"])  # fmt: skip
        wall = time.perf_counter() - t0
        n = len(list((Path(tmp) / "out").glob("*_seg.nii.gz")))
    print(f"\npredict: {n} ACDC volumes in {wall:.1f} s ({wall / max(n, 1):.2f} s each, {torch.get_num_threads()} threads), "
          "config and model load included, interpreter start not")  # fmt: skip
    import yaml

    data = yaml.safe_load((run / "config.yaml").read_text())["data"]
    grids = [(float(data["spacing"]), int(data["img_size"])), (1.367, 192)]
    if args.round_trip:
        print("\n| grid | structure | round-trip Dice: mean | min | patients |\n|---|---|---|---|---|")
    for spacing, size in grids if args.round_trip else []:
        pre, dice = Preprocessor(spacing=spacing, size=size), {1: [], 2: [], 3: []}
        for pid in range(1, args.round_trip + 1):
            patient = f"patient{pid:03d}"
            info = read_info_cfg(root / patient / "Info.cfg", patient)
            stem = f"{patient}_frame{int(info['ED']):02d}"
            raw = read_nifti_pair(root / patient / f"{stem}.nii.gz", root / patient / f"{stem}_gt.nii.gz", stem)
            onehot = np.eye(4, dtype=np.float32)[raw.label].transpose(3, 0, 1, 2)
            t, out = preprocess_traced(pre, raw.image, raw.affine, onehot)
            back = to_native(t, out["image"], out["label"].as_tensor(), raw.image.shape).argmax(0).numpy()
            for c in dice:
                a, b = back == c, raw.label == c
                dice[c].append(2 * float((a & b).sum()) / max(1, float(a.sum() + b.sum())))
        for c, name in ((1, "RV"), (2, "MYO"), (3, "LV")):
            print(
                f"| {spacing} mm, {size} px | {name} | {np.mean(dice[c]):.4f} | {np.min(dice[c]):.4f} | {args.round_trip} (ED) |"
            )


if __name__ == "__main__":
    main()
