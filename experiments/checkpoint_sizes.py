"""What a run leaves on disk: the bytes of the server's round file and of each client's state file
per round, for C clients, at the ACDC pre-training config's model (``configs/acdc/fcl_pretrain.yaml``:
encoder [16, 32, 64, 128, 128, 128], projection 1024 -> 128, banks 1024 / 4096), the phantom
standing in for ACDC (2 volumes per client) and 1 optimiser step a round (sizes do not depend on
the steps).

It measures whichever fcl-lightning is on ``PYTHONPATH`` (else the installed one), so the same command gives
"before" and "after" a change of the checkpoint layout::

    python experiments/checkpoint_sizes.py --clients 5,10 --rounds 3 --out runs/ckpt_sizes
    PYTHONPATH=<old checkout>/src python experiments/checkpoint_sizes.py --clients 5,10 --rounds 3 --out runs/ckpt_sizes_old

For each C it prints one row: the newest round file (``round-NNN.ckpt``), one client's newest state
file (``clients/client0/state-NNN.pt``; absent in the earlier layout, where the round file holds
every client's state), what one round writes (round file + the new client files), and what the
run folder's ``checkpoints/`` and ``clients/`` hold at the end (after retention, where there is
one). ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance.py beside this script


def folder_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def newest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda p: p.name) if paths else None


def measure(clients: int, rounds: int, img_size: int, root: Path, extra: list[str]) -> dict:
    import warnings

    from fcl_lightning.cli import main

    if root.exists():
        shutil.rmtree(root)
    with warnings.catch_warnings():  # this script's own argv is not the command's
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        fit(main, clients, rounds, img_size, root, extra)
    return sizes(root, clients, rounds, img_size)


def fit(main, clients: int, rounds: int, img_size: int, root: Path, extra: list[str]) -> None:
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "acdc" / "fcl_pretrain.yaml"),
            f"--trainer.default_root_dir={root}",
            "--trainer.accelerator=cpu",
            "--data.source=fcl_lightning.data.phantom.PhantomSource",
            f"--data.source.num_subjects={clients}",
            f"--data.source.num_sites={clients}",
            "--data.source.size=128",
            "--data.split=site",
            f"--data.num_clients={clients}",
            f"--data.img_size={img_size}",
            "--data.volumes_per_batch=1",
            f"--federation.rounds={rounds}",
            "--federation.local_steps=1",
            "--federation.monitor=null",
            *extra,
        ]
    )


def sizes(root: Path, clients: int, rounds: int, img_size: int) -> dict:
    ck = root / "checkpoints"
    round_file = newest([p for p in ck.glob("round-*.ckpt")])
    client_file = newest(list((root / "clients" / "client0").glob("state-*.pt")))
    client_bytes = client_file.stat().st_size if client_file else 0
    new_clients = sum(p.stat().st_size for p in (root / "clients").glob(f"client*/state-{rounds:03d}.pt"))
    return {
        "clients": clients,
        "img_size": img_size,
        "rounds": rounds,
        "round_file_bytes": round_file.stat().st_size if round_file else 0,
        "client_file_bytes": client_bytes,
        "written_per_round_bytes": (round_file.stat().st_size if round_file else 0) + new_clients,
        "checkpoints_dir_bytes": folder_bytes(ck),
        "clients_dir_bytes": folder_bytes(root / "clients"),
        "round_files_kept": sorted(p.name for p in ck.glob("round-*.ckpt")),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="5,10", help="comma-separated client counts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "ckpt_sizes")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--results", type=Path, default=None, help="a folder for results.md + provenance.json")
    ap.add_argument("extra", nargs="*", help="more CLI arguments for every run (after --)")
    args = ap.parse_args(argv)
    rows = []
    for c in (int(x) for x in args.clients.split(",")):
        rows.append(measure(c, args.rounds, args.img_size, args.out / f"c{c}", args.extra))
        shutil.rmtree(args.out / f"c{c}", ignore_errors=True)  # what was measured is in the row
    mib = 2**20
    table = [
        "| clients | round file | one client's state file | written per round | checkpoints/ + clients/ at the end |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['clients']} | {r['round_file_bytes'] / mib:.1f} MiB | {r['client_file_bytes'] / mib:.1f} MiB | "
            f"{r['written_per_round_bytes'] / mib:.1f} MiB | "
            f"{(r['checkpoints_dir_bytes'] + r['clients_dir_bytes']) / mib:.1f} MiB ({', '.join(r['round_files_kept'])}) |"
        )
    print("\n" + "\n".join(table))
    if args.results:
        import provenance

        body = (
            f"The ACDC pre-training config's model at {args.img_size} px, {args.rounds} rounds, the default "
            "retention; the phantom standing in for ACDC (sizes do not depend on the data).\n\n" + "\n".join(table)
        )
        provenance.write_results(args.results, "Checkpoint sizes", body, "the built-in phantom")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
