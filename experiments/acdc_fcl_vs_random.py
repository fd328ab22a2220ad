"""Real-data check of the method on ACDC: FCL pre-training on some clients, then local
fine-tuning with N labelled patients per client on *other* clients, from the FCL encoder and from
random init, scored on each fine-tuning client's held-out patients (mean +- std over clients).

Patients are split by id so that pre-training and fine-tuning clients never share a patient:
pre-training 1-12, 21-32, 41-52, 61-72, 81-92 (60 patients, 12 per ACDC group, 6 clients);
fine-tuning 13-20, 33-40, 53-60, 73-80, 93-100 (40 patients, 4 clients of 10; 5 labelled-pool
patients and 5 held-out test patients per client).

    python experiments/acdc_fcl_vs_random.py --root /path/to/ACDC/training --size 128 --rounds 5 --steps 150

Writes ``<out>/results.md`` and ``<out>/results.json``. Research use only (ACDC terms).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_PATIENTS = "1-12,21-32,41-52,61-72,81-92"
FINETUNE_PATIENTS = "13-20,33-40,53-60,73-80,93-100"


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "fcl_lightning.cli", *args]
    print("$ fcl-lightning " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", default="runs/acdc_fcl_vs_random")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument(
        "--spacing", type=float, default=2.0, help="in-plane mm/pixel; 128 px x 2.0 mm keeps the whole heart in view"
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps per client")
    ap.add_argument("--ns", default="1,2")
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--skip-pretrain", action="store_true")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    common = [
        f"--data.root={args.root}",
        f"--data.img_size={args.size}",
        f"--data.spacing={args.spacing}",
        f"--trainer.accelerator={args.accelerator}",
        f"--data.num_workers={args.num_workers}",
    ]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if not args.skip_pretrain:
        cli(
            "fit",
            "--config",
            "configs/acdc/fcl_pretrain.yaml",
            *common,
            f"--data.source.patients={PRETRAIN_PATIENTS}",
            "--data.num_clients=6",
            f"--federation.rounds={args.rounds}",
            f"--federation.local_epochs={args.local_epochs}",
            f"--trainer.default_root_dir={out}/pretrain",
        )
    timings["pretrain_s"] = time.perf_counter() - t0
    results = (
        json.loads((out / "pretrain" / "summary.json").read_text())
        if (out / "pretrain" / "summary.json").exists()
        else {}
    )
    table = {}
    for n in [int(x) for x in args.ns.split(",")]:
        for init in ("fcl", "random"):
            run = out / f"finetune_{init}_N{n}"
            ft = [
                "--config",
                "configs/acdc/finetune.yaml",
                *common,
                f"--data.source.patients={FINETUNE_PATIENTS}",
                "--data.num_clients=4",
                "--data.cv_folds=null",
                "--data.val_fraction=0.5",
                f"--data.labelled_per_client={n}",
                "--federation.mode=local",
                "--federation.rounds=1",
                f"--federation.local_steps={args.steps}",
                f"--trainer.default_root_dir={run}",
            ]
            if init == "fcl":
                ft.append(f"--model.pretrained={out}/pretrain/encoder.pt")
            t1 = time.perf_counter()
            cli("fit", *ft)
            cli("test", *ft, "--ckpt_path=last")
            timings[f"{init}_N{n}_s"] = time.perf_counter() - t1
            s = json.loads((run / "summary.json").read_text())
            table[(init, n)] = s
    lines = [
        "| init | N | Dice RV | Dice Myo | Dice LV | Dice mean | HD95 mean (mm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (init, n), s in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = [
            f"{s[f'test/{k}']:.3f} ± {s[f'test/{k}_std']:.3f}" for k in ("dice_rv", "dice_myo", "dice_lv", "dice_mean")
        ]
        lines.append(
            f"| {'FCL' if init == 'fcl' else 'random'} | {n} | " + " | ".join(cells) + f" | {s['test/hd95_mean']:.1f} |"
        )
    md = "\n".join(lines)
    print(md)
    (out / "results.md").write_text(md + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "timings": timings,
                "pretrain": results.get("pretrain"),
                "finetune": {f"{i}_N{n}": s for (i, n), s in table.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
