"""Peak memory of ``fcl-lightning predict`` against the number of inputs (it should stay flat).

Writes ``--max`` phantom scans (ACDC layout, ``--size`` pixels in-plane), fine-tunes a small
model for a few steps (the weights do not matter here), then runs ``predict`` on the first N
scans for each N of ``--inputs`` in a fresh process each and prints that process's peak RSS.

    python experiments/predict_memory.py --inputs 10 200 --size 256

``--src PATH`` runs the predict processes with another checkout's ``src`` first on the path (to
compare with an earlier version). Prints one markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEASURE = (
    "import resource, sys\n"
    "from fcl_lightning.cli import console_main\n"
    "try:\n"
    "    console_main(sys.argv[1:])\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    "else:\n"
    "    code = 0\n"
    "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'EXIT', code, file=sys.stderr)\n"
)
FINETUNE = [
    "--config", str(REPO / "configs/demo_finetune.yaml"), "--trainer.accelerator=cpu",
    "--model.features=[8,16,16,16]", "--data.img_size=32", "--data.spacing=3.0", "--data.augment_on=device",
    "--data.source.num_subjects=8", "--data.source.size=64", "--data.source.num_sites=2",
    "--data.test_source.num_subjects=2", "--data.test_source.size=64", "--data.num_clients=2",
    "--federation.local_steps=2", "--federation.rounds=1",
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, nargs="+", default=[10, 200])
    ap.add_argument("--size", type=int, default=256, help="in-plane pixels of each scan")
    ap.add_argument("--src", default=None, help="another checkout's src folder to run predict from")
    ap.add_argument("--results", type=Path, default=None, help="a folder for results.md + provenance.json")
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    from fcl_lightning.cli import main as cli
    from fcl_lightning.data.phantom import PhantomSource, write_acdc_layout

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = tmp / "run"
        cli(["fit", *FINETUNE, f"--trainer.default_root_dir={run}"])
        n_max = max(args.inputs)
        scans = write_acdc_layout(
            PhantomSource(num_subjects=(n_max + 1) // 2, size=args.size, seed=3), str(tmp / "scans")
        )
        patients = sorted(Path(scans).glob("patient*"))
        env = dict(os.environ)
        if args.src:
            env["PYTHONPATH"] = os.pathsep.join([args.src, env.get("PYTHONPATH", "")])
        rows = []
        for n in args.inputs:
            subset = tmp / f"in{n}"
            subset.mkdir()
            for p in patients[: (n + 1) // 2]:
                (subset / p.name).symlink_to(p)
            argv = ["predict", *FINETUNE, f"--trainer.default_root_dir={run}", "--ckpt_path=last",
                    f"--input={subset}", f"--output={tmp / f'out{n}'}"]  # fmt: skip
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", MEASURE, *argv], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            line = [ln for ln in proc.stderr.splitlines() if ln.startswith("PEAK_KB")]
            if not line or not line[0].endswith("EXIT 0"):
                raise SystemExit(f"predict of {n} inputs failed:\n{proc.stderr[-3000:]}")
            peak_mb = int(line[0].split()[1]) / 1024
            rows.append((n, peak_mb, wall))
        table = [f"| inputs ({args.size} px) | peak RSS (MiB) | wall (s) |", "|---|---|---|"]
        table += [f"| {n} | {mb:.0f} | {wall:.1f} |" for n, mb, wall in rows]
        print("\n".join(table))
    if args.results:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import provenance

        body = (
            f"`predict` of phantom scans ({args.size} x {args.size} x 8-12 voxels) with a small fine-tuned model, each "
            "count in a fresh process; peak resident memory of that process.\n\n" + "\n".join(table)
        )
        provenance.write_results(args.results, "Predict memory", body, "phantom scans")


if __name__ == "__main__":
    main()
