"""Regenerate the FCL paper's Tables 1 and 2 (local and federated fine-tuning, Dice against the
number N of labelled patients per client) for a list of methods, on the phantom or on ACDC.

For every method it pre-trains once (``configs/methods/<method>.yaml`` on top of the profile's
pre-training config; ``random`` skips pre-training), then for every setting (local, federated),
N, fold and seed fine-tunes from that encoder and tests. It writes, under ``--out``:

- ``results.csv``: method, setting, N, client, fold, seed, Dice per structure and mean, HD95;
- ``results.md``: the two tables, mean +- std over clients (after averaging folds and seeds);
- ``dice_vs_n_local.png``, ``dice_vs_n_federated.png``: Dice against N per method.

It resumes: a finished cell (pre-training with its ``encoder.pt``, fine-tuning with its test
figures) is never run again, and an interrupted pre-training continues from its last round.
Each fine-tuning cell records its arguments (``cell.json``); a call whose arguments for a cell
differ (another ``--finetune-arg`` budget, say; ``--report-only`` too) is refused before it writes
anything: another budget or recipe goes to another ``--out`` (``--pretrain-from`` reuses the
encoders). ``--records DIR`` keeps each finished cell's figures, curve and arguments, and the
pre-trainings' encoders (``experiments/records.py``), in a folder that can be committed, so that a
table filled over several machines is reported as one: an empty ``--out`` gets the recorded cells
back as finished, fine-tunes from the recorded encoders, and runs only what is left.

    python experiments/run_tables.py --profile quick
    python experiments/run_tables.py --profile acdc-cpu --root /path/to/ACDC/training
    python experiments/run_tables.py --profile paper --root /path/to/ACDC/training   # a GPU

Profiles: ``quick`` (phantom, CPU, minutes), ``acdc-cpu`` (real ACDC at reduced image size and
rounds, about an hour on 2 CPU cores), ``acdc-plateau`` (acdc-cpu's data, every few-label arm
trained to its plateau: N=1 1,500 steps, N=2 3,000; BCP and FCL + BCP from two pre-trainings, 3
seeds; many hours on 2 cores, resumable), ``acdc-disjoint`` (pre-training and fine-tuning clients
share no patient), ``paper`` (ACDC at the paper's scale: 10 clients x 10 patients, 5-fold CV inside
each client, N in 1/2/4/8).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # the repository's package, installed or not

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
import records  # noqa: E402

from fcl_lightning.evaluation import mean_std, paired_gain  # noqa: E402 (after the path it comes from)
from fcl_lightning.layout import INIT_ENCODER  # noqa: E402

METHODS_DIR = REPO / "configs" / "methods"
SEMI_DIR = REPO / "configs" / "semi"  # METHOD+SEMI: fine-tuning with configs/semi/<SEMI>.yaml
NO_PRETRAIN = "random"  # random init: no pre-training cell
COLUMNS = [
    "method",
    "setting",
    "N",
    "client",
    "fold",
    "seed",
    "dice_rv",
    "dice_myo",
    "dice_lv",
    "dice_mean",
    "hd95_mean",
]
LABELS = {
    "random": "Random init",
    "local_cl": "Local CL",
    "fedsimclr": "FedSimCLR",
    "fedrotation": "FedRotation",
    "fedswav": "FedSwAV",
    "fcl": "FCL",
    "fcl_no_exchange": "FCL w/o exchange",
    "fcl_no_remote": "FCL w/o remote term",
    "fcl_no_momentum": "FCL w/o momentum encoder",
    "fcl_literal": "FCL, paper's literal local term",
    "fcl_dense": "FCL + dense term (extension)",
    "fclopt": "FCLOpt (no negatives, no exchange)",
    "fcl_dp8": "FCL, DP exchange at epsilon 8",
    "fcl_dp2": "FCL, DP exchange at epsilon 2",
    "fcl_dp1": "FCL, DP exchange at epsilon 1",
    "fcl_dp8w": "FCL, DP exchange and DP weights at epsilon 8",
}
SEMI_LABELS = {
    "unimatch": "UniMatch",
    "unimatch_short": "UniMatch (threshold 0.8)",
    "mean_teacher": "mean teacher",
    "bcp": "BCP",
    "bcp_halves": "BCP (paired in halves)",
}


def split_method(method: str) -> tuple[str, str, str]:
    """``METHOD[~S][@R][+SEMI]`` -> (pre-training run, round or '', semi-supervised config or '');
    the pre-training run ``METHOD~S`` is METHOD pre-trained with seed S (a second pre-training)."""
    head, _, semi = method.partition("+")
    base, _, rnd = head.partition("@")
    return base, rnd, semi


def pretrain_config(base: str) -> tuple[str, int | None]:
    """A pre-training run's method config and its seed (``None``: the config's own)."""
    name, _, seed = base.partition("~")
    return name, (int(seed) if seed else None)


def label(method: str) -> str:
    """A method's row label; semi-supervised fine-tuning is marked as the project's extension."""
    base, rnd, semi = split_method(method)
    name, seed = pretrain_config(base)
    out = LABELS.get(name, name) + (f" (pre-training seed {seed})" if seed is not None else "")
    out += f" @ round {rnd}" if rnd else ""
    return out + (f" + {SEMI_LABELS.get(semi, semi)} (extension)" if semi else "")


PAPER_METHODS = ["random", "local_cl", "fedrotation", "fedsimclr", "fedswav", "fcl"]
ABLATIONS = ["fcl_no_exchange", "fcl_no_remote", "fcl_no_momentum"]


@dataclass
class Profile:
    pretrain: list[str]  # CLI arguments of every pre-training run (config first)
    finetune: list[str]  # CLI arguments of every fine-tuning run
    ns: list[int]
    methods: list[str]
    settings: list[str] = field(default_factory=lambda: ["local", "federated"])
    folds: list[int | None] = field(default_factory=lambda: [None])
    seeds: list[int] = field(default_factory=lambda: [0])
    needs_root: bool = False
    # extra fine-tuning arguments for one N (after ``finetune``), e.g. a longer budget where more
    # labels keep an arm rising for longer
    finetune_by_n: dict[int, list[str]] = field(default_factory=dict)


# 5 clients (one ACDC disease group each) x 20 patients, 64 px at 3.5 mm; a quarter of every
# client's patients is held out of pre-training *and* fine-tuning and is what both are scored on
ACDC_CPU_DATA = [
    "--data.img_size=64",
    "--data.spacing=3.5",
    "--data.num_clients=5",
    "--data.split=group",
    "--data.val_fraction=0.25",
    "--data.augment_on=device",  # batched augmentation: fine-tuning cells take about half as long
]
#: acdc-cpu's pre-training: 16 rounds x 40 steps = 640 steps per client
ACDC_CPU_PRETRAIN = [
    "--config",
    "configs/acdc/fcl_pretrain.yaml",
    *ACDC_CPU_DATA,
    "--federation.rounds=16",
    "--federation.local_steps=40",
    "--model.proj_hidden=512",
]
#: its fine-tuning, before the budget (rounds x local steps)
ACDC_CPU_FINETUNE = [
    "--config",
    "configs/acdc/finetune.yaml",
    *ACDC_CPU_DATA,
    "--data.cv_folds=null",
    "--data.batch_size=8",
]
PROFILES: dict[str, Profile] = {
    # the phantom: 4 clients (one per site), held-out phantom test set
    "quick": Profile(
        pretrain=["--config", "configs/demo_pretrain.yaml", "--federation.rounds=3", "--federation.local_epochs=1"],
        finetune=["--config", "configs/demo_finetune.yaml", "--federation.rounds=2", "--federation.local_steps=30"],
        ns=[1, 2],
        methods=PAPER_METHODS + ABLATIONS,
    ),
    # real ACDC on a CPU: pre-train on 15 patients per client (16 rounds x 40 steps = 640 steps
    # per client), fine-tune on N of them (6 rounds x 50 steps, validated on the held-out patients
    # after every round: the Dice-vs-steps curve) and score on the 5 held-out patients per client
    "acdc-cpu": Profile(
        pretrain=ACDC_CPU_PRETRAIN,
        finetune=[*ACDC_CPU_FINETUNE, "--federation.rounds=6", "--federation.local_steps=50"],
        ns=[1, 2],
        methods=["random", "fcl"],
        settings=["local"],
        seeds=[0, 1],
        needs_root=True,
    ),
    # acdc-cpu's data and pre-training, every fine-tuning arm trained to its plateau: N=1 1,500
    # steps a client (6 rounds of 250, held-out Dice after each: the curve), N=2 3,000 (12 rounds;
    # at 1,500 the BCP arms were still rising), the rate decayed poly over them (UniMatch's and
    # BCP's schedule) for every arm alike; FCL + BCP from two pre-training runs (fcl, fcl~1), 3
    # fine-tuning seeds; another budget goes to another --out, e.g. --finetune-arg=
    # --federation.rounds=12 --out runs/tables/acdc-plateau-3000 --pretrain-from runs/tables/acdc-plateau
    # (the same encoders, not pre-trained again)
    "acdc-plateau": Profile(
        pretrain=ACDC_CPU_PRETRAIN,
        finetune=[
            *ACDC_CPU_FINETUNE,
            "--federation.rounds=6",
            "--federation.local_steps=250",
            "--model.lr_schedule=poly",
        ],
        ns=[1, 2],
        methods=["random", "random+bcp", "fcl+bcp", "fcl~1+bcp", "fcl"],
        settings=["local"],
        seeds=[0, 1, 2],
        needs_root=True,
        finetune_by_n={2: ["--federation.rounds=12"]},
    ),
    # pre-training and fine-tuning on disjoint patients: FCL on 60 patients (12 per ACDC group, 6
    # clients), local fine-tuning on the other 40 (4 clients of 10: 5 labelled-pool and 5 held-out
    # patients each), 128 px at 2 mm; what experiments/acdc_fcl_vs_random.py used to run
    "acdc-disjoint": Profile(
        pretrain=[
            "--config",
            "configs/acdc/fcl_pretrain.yaml",
            "--data.img_size=128",
            "--data.spacing=2.0",
            "--data.source.patients=1-12,21-32,41-52,61-72,81-92",
            "--data.num_clients=6",
            "--federation.rounds=10",
        ],
        finetune=[
            "--config",
            "configs/acdc/finetune.yaml",
            "--data.img_size=128",
            "--data.spacing=2.0",
            "--data.source.patients=13-20,33-40,53-60,73-80,93-100",
            "--data.num_clients=4",
            "--data.cv_folds=null",
            "--data.val_fraction=0.5",
            "--federation.rounds=1",
            "--federation.local_steps=200",
        ],
        ns=[1, 2],
        methods=["random", "fcl"],
        settings=["local"],
        needs_root=True,
    ),  # fmt: skip
    # the paper's setting: 10 clients x 10 patients, 192 px, 5-fold CV inside each client
    "paper": Profile(
        pretrain=["--config", "configs/acdc/fcl_pretrain.yaml"],
        finetune=["--config", "configs/acdc/finetune.yaml", "--data.cv_folds=5"],
        ns=[1, 2, 4, 8],
        methods=PAPER_METHODS + ABLATIONS,
        folds=[0, 1, 2, 3, 4],
        needs_root=True,
    ),
}


CELL_FILE = "cell.json"  # a fine-tuning cell's arguments, as recorded_args keeps them
LOCATIONS = (  # where things lie, not what is computed: a moved folder or data set is the same cell
    "--trainer.default_root_dir=",
    "--data.cache_dir=",
    "--data.root=",
    "--model.pretrained=",
    "--trainer.accelerator=",
)


def recorded_args(args: list[str]) -> list[str]:
    """A cell's arguments without the locations (``LOCATIONS``; config files relative to the
    repository): what two runs of the same cell must share."""
    out = []
    for prev, a in zip(["", *args], args):
        if a.startswith(LOCATIONS):
            continue
        out.append(os.path.relpath(a, REPO) if prev == "--config" and os.path.isabs(a) else a)
    return out


def cli(args: list[str]) -> None:
    """One ``fcl-lightning`` command, in this process (no interpreter start-up per cell); config
    files are named relative to the repository."""
    import warnings

    from fcl_lightning.cli import main

    with warnings.catch_warnings():  # this script's own argv is not the command's
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        main(
            [str(REPO / a) if prev == "--config" and not os.path.isabs(a) else a for prev, a in zip(["", *args], args)]
        )


def pretrain_uses_local_mode(method: str) -> bool:
    import yaml

    cfg = yaml.safe_load((METHODS_DIR / f"{pretrain_config(method)[0]}.yaml").read_text()) or {}
    return (cfg.get("federation") or {}).get("mode") == "local"


class Runner:
    def __init__(
        self,
        profile: Profile,
        out: Path,
        common: list[str],
        extra_pretrain: list[str],
        extra_finetune: list[str],
        log=print,
        pretrain_root: Path | None = None,
        records_dir: Path | None = None,
    ) -> None:
        self.p, self.out, self.common = profile, out, common
        self.extra_pretrain, self.extra_finetune = extra_pretrain, extra_finetune
        self.log = log
        self.pretrain_root = pretrain_root or out / "pretrain"
        self.records_dir = records_dir  # experiments/records.py: the finished cells' records, kept apart
        self.times: dict[str, list[float]] = {"pretrain": [], "finetune": []}

    # ---------------------------------------------------------------- cells
    def pretrain_dir(self, method: str) -> Path:
        return self.pretrain_root / method

    def finetune_dir(self, method: str, setting: str, n: int, fold: int | None, seed: int) -> Path:
        return self.out / "finetune" / method / f"{setting}_N{n}_fold{'-' if fold is None else fold}_seed{seed}"

    def pretrain_done(self, method: str) -> bool:
        return method == NO_PRETRAIN or (self.pretrain_dir(method) / "encoder.pt").is_file()

    def encoder_path(self, method: str) -> str:
        """``method`` (the end of its pre-training), ``method@R`` (its round-R checkpoint) or
        ``method@0`` (the weights it started from: the paired random init)."""
        base, rnd, _ = split_method(method)
        pre = self.pretrain_dir(base)
        if not rnd:
            return str(pre / "encoder.pt")
        if int(rnd) == 0:
            return str(pre / INIT_ENCODER)
        path = pre / "checkpoints" / f"round-{int(rnd):03d}.ckpt"
        if not path.is_file() and self.pretrain_done(base):
            kept = sorted(int(p.stem.split("-")[1]) for p in (pre / "checkpoints").glob("round-*.ckpt"))
            raise SystemExit(
                f"{method}: round {int(rnd)} of {base}'s pre-training was not kept ({pre / 'checkpoints'} holds "
                f"rounds {', '.join(map(str, kept)) or 'none'}; federation.checkpoint_keep decides which stay, "
                "and this runner keeps every round of the pre-trainings it starts)"
            )
        return str(path)

    def finetune_done(self, d: Path) -> bool:
        s = d / "summary.json"
        return s.is_file() and "test/dice_mean" in json.loads(s.read_text()) and (d / "test_per_patient.csv").is_file()

    def run_pretrain(self, method: str) -> None:
        d = self.pretrain_dir(method)
        name, seed = pretrain_config(method)
        args = [
            "fit",
            *self.p.pretrain,
            "--config",
            str(METHODS_DIR / f"{name}.yaml"),
            *([f"--seed_everything={seed}"] if seed is not None else []),
            "--federation.checkpoint_keep.every=1",  # every round's weights, for METHOD@R cells
            *self.common,
            *self.extra_pretrain,
            f"--trainer.default_root_dir={d}",
        ]
        if (d / "checkpoints" / "last.ckpt").is_file():
            args.append("--ckpt_path=last")  # an interrupted pre-training continues at its next round
        elif d.is_dir():  # stopped before its first checkpoint: start again
            shutil.rmtree(d)
        cli(args)

    def finetune_args(self, method: str, setting: str, n: int, fold: int | None, seed: int) -> list[str]:
        """The CLI arguments of one fine-tuning cell (``fit`` and ``test`` alike)."""
        d = self.finetune_dir(method, setting, n, fold, seed)
        args = [
            *self.p.finetune,
            *self.p.finetune_by_n.get(n, []),
            *self.common,
            *self.extra_finetune,
            f"--data.labelled_per_client={n}",
            f"--federation.mode={setting}",
            f"--seed_everything={seed}",
            f"--trainer.default_root_dir={d}",
        ]
        if fold is not None:
            args.append(f"--data.cv_fold={fold}")
        base, rnd, semi = split_method(method)
        if semi:
            args = [*self.p.finetune, "--config", str(SEMI_DIR / f"{semi}.yaml"), *args[len(self.p.finetune) :]]
        if base != NO_PRETRAIN:
            pre = self.pretrain_dir(base)
            if setting == "local" and (pre / "encoders").is_dir() and not rnd:
                args.append(f"--model.pretrained={pre}/encoders/client{{client}}.pt")  # each client its own
            else:
                args.append(f"--model.pretrained={self.encoder_path(method)}")
        return args

    def run_finetune(self, method: str, setting: str, n: int, fold: int | None, seed: int) -> None:
        from fcl_lightning.io import atomic_write_text

        d = self.finetune_dir(method, setting, n, fold, seed)
        args = self.finetune_args(method, setting, n, fold, seed)
        fit = ["fit", *args]
        if (d / "checkpoints" / "last.ckpt").is_file():
            fit.append("--ckpt_path=last")  # an interrupted fine-tuning continues at its next round, bitwise
        elif d.is_dir():  # stopped before its first checkpoint: start again
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps({"args": recorded_args(args)}, indent=1), d / CELL_FILE)
        cli(fit)
        cli(["test", *args, "--ckpt_path=last"])

    def cells(self, methods: list[str]) -> list[tuple]:
        out: list[tuple] = []
        for m in methods:
            base = split_method(m)[0]
            if ("pretrain", base) not in out:
                out.append(("pretrain", base))
            for setting in self.p.settings:
                for n in self.p.ns:
                    for fold in self.p.folds:
                        for seed in self.p.seeds:
                            out.append(("finetune", m, setting, n, fold, seed))
        return out

    def is_done(self, cell: tuple) -> bool:
        if cell[0] == "pretrain":
            return self.pretrain_done(cell[1])
        return self.finetune_done(self.finetune_dir(*cell[1:]))

    def eta(self, todo: list[tuple]) -> str:
        est = 0.0
        for kind in ("pretrain", "finetune"):
            if not self.times[kind]:
                return "ETA after the first cells"
            left = sum(1 for c in todo if c[0] == kind and not (kind == "pretrain" and c[1] == NO_PRETRAIN))
            est += left * float(np.mean(self.times[kind]))
        return f"ETA {est / 60:.1f} min"

    def check_recorded_args(self, cells: list[tuple]) -> None:
        """Refuse a folder whose cells were run with other fine-tuning arguments (another budget,
        say) than this call would use: resuming or reporting them would mix the two silently."""
        clashes = []
        for cell in cells:
            if cell[0] != "finetune" or not (f := self.finetune_dir(*cell[1:]) / CELL_FILE).is_file():
                continue
            try:
                was = json.loads(f.read_text())["args"]
            except (ValueError, KeyError, TypeError):
                raise SystemExit(
                    f"{f}: not a cell record of this runner; remove {f.parent} to run that cell again"
                ) from None
            now = recorded_args(self.finetune_args(*cell[1:]))
            if was != now:
                diff = sorted(set(was) ^ set(now)) or ["(the same arguments in another order)"]
                clashes.append(f"{f.parent}: {' '.join(diff)}")
        if clashes:
            raise SystemExit(
                f"{len(clashes)} cell(s) under {self.out} were run with other fine-tuning arguments than this call's "
                f"(each cell with the arguments only one side has): {'; '.join(clashes[:3])}"
                + (f"; and {len(clashes) - 3} more" if len(clashes) > 3 else "")
                + ". Use another --out for another budget or recipe, or the arguments those cells were run with"
            )

    # -------------------------------------------------------------- records
    def cell_dir(self, cell: tuple) -> Path:
        return self.pretrain_dir(cell[1]) if cell[0] == "pretrain" else self.finetune_dir(*cell[1:])

    def record_of(self, cell: tuple) -> Path:
        """Where ``cell``'s record lies in the records folder (the run folder's layout)."""
        assert self.records_dir is not None
        if cell[0] == "pretrain":
            return self.records_dir / "pretrain" / cell[1]
        return self.records_dir / self.finetune_dir(*cell[1:]).relative_to(self.out)

    def recorded(self, cells: list[tuple]) -> list[tuple]:
        """The cells the records folder can give this run folder: finished fine-tunings, and the
        pre-trainings with their encoders (when this folder pre-trains; not with ``--pretrain-from``)."""
        if self.records_dir is None:
            return []
        own_pretrain = self.pretrain_root == self.out / "pretrain"
        return [
            c
            for c in cells
            if (c[0] == "pretrain" and c[1] != NO_PRETRAIN and own_pretrain and self.record_of(c).is_dir())
            or (c[0] == "finetune" and self.finetune_done(self.record_of(c)))
        ]

    def restore_records(self, cells: list[tuple]) -> int:
        """Copy into the run folder the records of the cells it has no folder for (a run there is
        left as it is), and the records' provenance; how many cells were restored."""
        n = sum(records.restore(self.record_of(c), self.cell_dir(c), c[0] == "pretrain") for c in self.recorded(cells))
        if self.records_dir is not None:
            records.write_provenance(self.out, records.merge_provenance(self.records_dir, self.out))
        return n

    def check_encoders(self, cells: list[tuple]) -> None:
        """Every finished pre-training hashes as its record says (see ``records.check_encoders``)."""
        for c in cells:
            if self.records_dir is not None and c[0] == "pretrain" and c[1] != NO_PRETRAIN:
                records.check_encoders(self.pretrain_dir(c[1]), self.record_of(c), c[1])

    def save_record(self, cell: tuple) -> None:
        """Record a finished cell (a pre-training only after its encoders passed ``check_encoders``)."""
        if self.records_dir is None or (cell[0] == "pretrain" and cell[1] == NO_PRETRAIN) or not self.is_done(cell):
            return
        if cell[0] == "pretrain":
            if self.pretrain_root != self.out / "pretrain":
                return  # another table's pre-training: recorded there
            self.check_encoders([cell])
        records.save(self.cell_dir(cell), self.record_of(cell), cell[0] == "pretrain")

    def save_records(self, cells: list[tuple]) -> None:
        """Record every finished cell and merge this folder's provenance into the records'."""
        if self.records_dir is None:
            return
        for c in cells:
            self.save_record(c)
        records.write_provenance(self.records_dir, records.merge_provenance(self.records_dir, self.out))

    # ------------------------------------------------------------------ run
    def run(self, methods: list[str], pretrain_only: bool = False) -> None:
        cells = [c for c in self.cells(methods) if c[0] == "pretrain" or not pretrain_only]
        self.check_recorded_args(cells)
        self.check_encoders(cells)
        todo = [c for c in cells if not self.is_done(c)]
        # a pre-training none of whose fine-tuning cells is left (all restored from records, say) is not run
        todo = [
            c
            for c in todo
            if c[0] == "finetune"
            or pretrain_only
            or any(f[0] == "finetune" and split_method(f[1])[0] == c[1] for f in todo)
        ]
        self.log(f"{len(cells)} cells, {len(cells) - len(todo)} already finished, {len(todo)} to run")
        for i, cell in enumerate(todo):
            name = " ".join("-" if x is None else str(x) for x in cell)
            self.log(f"[cell {i + 1}/{len(todo)}] {name} ({self.eta(todo[i:])})")
            t0 = time.perf_counter()
            if cell[0] == "pretrain":
                if cell[1] == NO_PRETRAIN:
                    continue
                self.run_pretrain(cell[1])
            else:
                self.run_finetune(*cell[1:])
            self.times[cell[0]].append(time.perf_counter() - t0)
            self.save_record(cell)
            self.log(f"[cell {i + 1}/{len(todo)}] done in {time.perf_counter() - t0:.0f} s")

    # -------------------------------------------------------------- results
    def rows(self, methods: list[str]) -> list[dict]:
        """One row per (cell, client): the client's mean over its test volumes."""
        rows = []
        for cell in self.cells(methods):
            if cell[0] != "finetune" or not self.is_done(cell):
                continue
            method, setting, n, fold, seed = cell[1:]
            per: dict[str, list[dict]] = {}
            with open(self.finetune_dir(*cell[1:]) / "test_per_patient.csv") as fh:
                for r in csv.DictReader(fh):
                    per.setdefault(r["client"], []).append(r)
            for client, vols in sorted(per.items()):
                row = {
                    "method": method,
                    "setting": setting,
                    "N": n,
                    "client": client,
                    "fold": "" if fold is None else fold,
                    "seed": seed,
                }
                for k in COLUMNS[6:]:
                    row[k] = mean_std([float(v[k]) if v.get(k) not in (None, "") else math.nan for v in vols])[0]
                rows.append(row)
        return rows


def table(rows: list[dict], methods: list[str], ns: list[int], setting: str) -> tuple[str, dict]:
    """Markdown shaped like the paper's tables: mean +- std over clients of each client's Dice
    (averaged over folds and seeds first). Where a column's methods have different seeds (a table
    still being filled), each cell names its seeds, so that no two means are read as paired."""
    stats: dict[str, dict[int, tuple[float, float]]] = {}
    lines = ["| method | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    mine = [r for r in rows if r["setting"] == setting]
    seeds = {
        (m, n): sorted({int(r["seed"]) for r in mine if r["method"] == m and r["N"] == n}) for m in methods for n in ns
    }
    uneven = {n: len({tuple(seeds[m, n]) for m in methods if seeds[m, n]}) > 1 for n in ns}
    for m in methods:
        cells = []
        for n in ns:
            by_client: dict[str, list[float]] = {}
            for r in mine:
                if r["method"] == m and r["N"] == n:
                    by_client.setdefault(str(r["client"]), []).append(r["dice_mean"])
            if not by_client:
                cells.append("-")
                continue
            mean, std = stats.setdefault(label(m), {})[n] = mean_std([mean_std(v)[0] for v in by_client.values()])
            cell = f"{mean:.3f} ± {std:.3f}" if len(by_client) > 1 else f"{mean:.3f}"
            if uneven[n]:
                s = seeds[m, n]
                cell += f" (seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))})"
            cells.append(cell)
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), stats


def paired(rows: list[dict], method: str, setting: str, n: int) -> dict[tuple, float]:
    """(client, fold, seed) -> Dice of one method's cells: what gains are paired on."""
    return {
        (str(r["client"]), str(r["fold"]), int(r["seed"])): float(r["dice_mean"])
        for r in rows
        if r["method"] == method and r["setting"] == setting and r["N"] == n
    }


def gains(rows: list[dict], methods: list[str], ns: list[int], setting: str, baseline: str = NO_PRETRAIN) -> str:
    """Markdown: every method's gain over ``baseline``, paired over (client, seed): mean paired
    difference, 95% bootstrap interval, pairs in its favour; an interval that holds 0 is 'not shown'."""
    lines = [
        f"| method | vs {label(baseline)} | " + " | ".join(f"N={n}" for n in ns) + " |",
        "|---|---|" + "---|" * len(ns),
    ]
    for m in methods:
        if m == baseline:
            continue
        cells = []
        for n in ns:
            g = paired_gain(paired(rows, m, setting, n), paired(rows, baseline, setting, n))
            cells.append("-" if g is None else str(g))
        lines.append(f"| {label(m)} | paired gain | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pooled_gains(rows: list[dict], methods: list[str], ns: list[int], setting: str) -> list[str]:
    """Markdown: a pre-trained arm against its random-init counterpart (``fcl+bcp`` against
    ``random+bcp``, ``fcl`` against ``random``) pooled over every pre-training run of the method
    (``fcl``, ``fcl~1``, ...): pairs (pre-training run, client, seed), so one lucky pre-training
    cannot carry the claim. Only where two or more pre-training runs finished."""
    groups: dict[tuple[str, str], list[str]] = {}
    for m in methods:
        base, rnd, semi = split_method(m)
        if base != NO_PRETRAIN and not rnd:
            groups.setdefault((pretrain_config(base)[0], semi), []).append(m)
    lines = []
    for (name, semi), arms in groups.items():
        baseline = NO_PRETRAIN + (f"+{semi}" if semi else "")
        runs = len({m for m in arms if any(r["method"] == m for r in rows)})
        if runs < 2 or baseline not in methods:
            continue
        cells = []
        for n in ns:
            ref = paired(rows, baseline, setting, n)
            pooled, against = {}, {}
            for m in arms:
                for k, v in paired(rows, m, setting, n).items():
                    if k in ref:
                        pooled[(m, *k)], against[(m, *k)] = v, ref[k]
            g = paired_gain(pooled, against)
            if len({k[0] for k in pooled}) < 2:  # one run at this N: not a pooled figure
                g = None
            cells.append("-" if g is None else str(g))
        lines.append(
            f"| {label(name + (f'+{semi}' if semi else ''))}, {runs} pre-training runs pooled | vs {label(baseline)} | "
            + " | ".join(cells) + " |"
        )  # fmt: skip
    if not lines:
        return []
    return [
        "Pre-training's gain pooled over its pre-training runs: pairs (pre-training run, client, seed).",
        "",
        "| method | against | " + " | ".join(f"N={n}" for n in ns) + " |",
        "|---|---|" + "---|" * len(ns),
        *lines,
        "",
    ]


def read_rounds(run_dir: Path, key: str) -> dict[int, float]:
    """round -> ``key`` from a run's ``metrics.csv`` files (every ``logs/version_*``, later
    versions winning: a resumed run writes a new one). Round 0: measured at initialisation."""
    by_round: dict[int, float] = {}
    for log in sorted((run_dir / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        if (log / "metrics.csv").is_file():
            with open(log / "metrics.csv") as fh:
                by_round.update(
                    {
                        int(float(r["round"])): float(r[key])
                        for r in csv.DictReader(fh)
                        if r.get(key) not in (None, "") and r.get("round") not in (None, "")
                    }
                )
    return dict(sorted(by_round.items()))


#: a curve is flat when its last third gains less than this (Dice)
FLAT = 0.01


def local_steps(args: list[str]) -> int | None:
    """``--federation.local_steps`` of a profile's arguments (the last one given)."""
    found = [a.split("=", 1)[1] for a in args if a.startswith("--federation.local_steps=")]
    return int(found[-1]) if found else None


def plateau_gain(curve: list[float]) -> float | None:
    """What a curve gained over its last third: the end against the round at two thirds of it
    (``None`` for fewer than 3 rounds)."""
    if len(curve) < 3:
        return None
    return float(curve[-1] - curve[(2 * len(curve)) // 3 - 1])


def curves(runner: Runner, methods: list[str]) -> list[str]:
    """Markdown: pre-training monitors per round, and held-out Dice after each fine-tuning round
    (mean over clients, then over seeds): the gain against fine-tuning steps."""
    out = []
    for m in sorted({split_method(m)[0] for m in methods} - {NO_PRETRAIN}):
        pre = runner.pretrain_dir(m)
        rows = [
            (label, read_rounds(pre, f"round/monitor/{key}"))
            for label, key in (
                ("k-NN partition probe, head", "probe_acc"),
                ("k-NN partition probe, encoder", "probe_acc_encoder"),
                ("spread", "spread"),
            )
        ]
        if rows[0][1]:
            rounds = list(rows[0][1])
            out += [
                f"## Pre-training monitors: {label(m)} (probe chance 1/S; round 0: initialisation)",
                "",
                "| round | " + " | ".join(map(str, rounds)) + " |",
                "|---|" + "---|" * len(rounds),
                *(
                    "| " + label + " | " + " | ".join(f"{vals.get(r, math.nan):.2f}" for r in rounds) + " |"
                    for label, vals in rows
                ),
                "",
            ]
    steps = local_steps(runner.p.finetune)
    for setting in runner.p.settings:
        lines = []
        figure: dict[str, tuple[list[int], list[float]]] = {}
        for m in methods:
            for n in runner.p.ns:
                runs = [  # finished cells only: one still training would cut every curve short
                    list(read_rounds(d, "round/val/dice_mean").values())
                    for f in runner.p.folds
                    for sd in runner.p.seeds
                    if runner.finetune_done(d := runner.finetune_dir(m, setting, n, f, sd))
                ]
                runs = [c for c in runs if c]
                if not runs:
                    continue
                r = min(len(c) for c in runs)
                mean = np.mean([c[:r] for c in runs], axis=0)
                last_third = plateau_gain(list(mean))
                if steps:
                    figure[f"{label(m)}, N={n}"] = ([steps * (i + 1) for i in range(r)], list(mean))
                flat = "-" if last_third is None else ("yes" if last_third < FLAT else "**no**")
                lines.append(
                    f"| {label(m)} | {n} | {len(runs)} | " + " / ".join(f"{v:.3f}" for v in mean)
                    + f" | {'-' if last_third is None else f'{last_third:+.4f}'} | {flat} |"  # 4 places: +0.0096 is flat
                )  # fmt: skip
        if lines:
            at = f"after every {steps} steps" if steps else "after each fine-tuning round"
            out += [
                f"## Held-out Dice {at} ({setting})",
                "",
                f"Mean over clients and seeds. Flat: the last third of the budget gains less than {FLAT} "
                "(the end against the round at two thirds).",
                "",
                "| method | N | runs | Dice after round 1 / 2 / ... | last third | flat |",
                "|---|---|---|---|---|---|",
                *lines,
                "",
            ]
        if figure:
            from fcl_lightning.figures import save_curves_figure

            save_curves_figure(runner.out / f"curves_{setting}.png", figure)
    return out


def write_results(runner: Runner, methods: list[str], profile_name: str, wall_s: float | None) -> str:
    from fcl_lightning.figures import save_dice_vs_n_figure
    from fcl_lightning.io import atomic_write, atomic_write_text

    rows = runner.rows(methods)

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)

    atomic_write(runner.out / "results.csv", write_csv)
    parts = [
        f"# FCL tables, profile `{profile_name}`",
        "",
        f"Dice (mean over RV, Myo, LV) per client, mean ± std over clients; {len(rows)} client rows"
        + (f"; this call's wall time {wall_s / 60:.1f} min." if wall_s is not None else "."),
        "",
    ]
    for setting, title in (("local", "Table 1: local fine-tuning"), ("federated", "Table 2: federated fine-tuning")):
        if setting not in runner.p.settings or not any(r["setting"] == setting for r in rows):
            continue
        md, stats = table(rows, methods, runner.p.ns, setting)
        parts += [f"## {title}", "", md, ""]
        if NO_PRETRAIN in methods and len(methods) > 1:
            parts += [
                f"Gains over random init, paired over (client, seed) pairs ({setting} fine-tuning): mean "
                "difference [95% bootstrap interval], pairs in its favour; an interval that holds 0 is not shown.",
                "",
                gains(rows, methods, runner.p.ns, setting),
                "",
            ]
        # what pre-training adds on top of semi-supervised fine-tuning: needs only the two arms
        on_top = []
        for m in methods:
            base, _, semi = split_method(m)
            semi_alone = f"{NO_PRETRAIN}+{semi}"
            if semi and base != NO_PRETRAIN and semi_alone in methods:
                on_top += [gains(rows, [semi_alone, m], runner.p.ns, setting, semi_alone), ""]
        if on_top:
            parts += [
                "Pre-training on top of the same semi-supervised fine-tuning, paired over (client, seed) pairs: "
                "mean difference [95% bootstrap interval], pairs in its favour.",
                "",
                *on_top,
            ]
        parts += pooled_gains(rows, methods, runner.p.ns, setting)
        if stats:
            save_dice_vs_n_figure(runner.out / f"dice_vs_n_{setting}.png", stats, title=f"{title} ({profile_name})")
    parts += curves(runner, methods)
    text = "\n".join(parts)
    atomic_write_text(text, runner.out / "results.md")
    return text


def int_list(minimum: int):
    """An argparse type: a comma list of integers, each at least ``minimum``."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers") from None
        if any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least {minimum}")
        return values

    return parse


def setting_list(text: str) -> list[str]:
    values = text.split(",")
    if any(v not in ("local", "federated") for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of local, federated")
    return values


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--root", default=None, help="ACDC training folder (acdc-cpu and paper profiles)")
    ap.add_argument("--out", default=None, help="default: runs/tables/<profile>")
    ap.add_argument(
        "--methods",
        default=None,
        help=f"comma list (default: the profile's); any of {sorted(LABELS)}, "
        "or METHOD@R to fine-tune from round R of METHOD's pre-training (METHOD@0: the weights it started from); "
        "METHOD+SEMI fine-tunes semi-supervised with configs/semi/SEMI.yaml (e.g. fcl+unimatch, random+unimatch)",
    )
    ap.add_argument("--ns", type=int_list(1), default=None, help="comma list of N (default: the profile's)")
    ap.add_argument("--settings", type=setting_list, default=None, help="local,federated (default: the profile's)")
    ap.add_argument(
        "--seeds", type=int_list(0), default=None, help="comma list of fine-tuning seeds (default: the profile's)"
    )
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write results.csv/.md and the figures from the cells finished so far",
    )
    ap.add_argument("--pretrain-arg", action="append", default=[], help="extra CLI argument of every pre-training")
    ap.add_argument("--finetune-arg", action="append", default=[], help="extra CLI argument of every fine-tuning")
    ap.add_argument(
        "--pretrain-from",
        default=None,
        metavar="DIR",
        help="fine-tune the finished pre-trainings of another table's --out folder (DIR/pretrain/<method>) "
        "instead of pre-training here, e.g. the same encoders at another fine-tuning budget",
    )
    ap.add_argument(
        "--pretrain-only",
        action="store_true",
        help="run only the methods' pre-trainings (their encoders first, the fine-tuning cells in a later call)",
    )
    ap.add_argument(
        "--records",
        default=None,
        metavar="DIR",
        help="a folder that keeps every finished cell's figures and the pre-trainings' encoders (experiments/records.py), "
        "e.g. one in git: its cells are copied into --out first and count as finished, each cell finished here is "
        "added to it",
    )
    args = ap.parse_args(argv)

    profile = PROFILES[args.profile]
    if args.ns:
        profile = Profile(**{**profile.__dict__, "ns": args.ns})
    if args.seeds:
        profile = Profile(**{**profile.__dict__, "seeds": args.seeds})
    if args.settings:
        profile = Profile(**{**profile.__dict__, "settings": args.settings})
    methods = args.methods.split(",") if args.methods else profile.methods
    unknown = [
        m
        for m in methods
        if (
            split_method(m)[0] != NO_PRETRAIN
            and not (METHODS_DIR / f"{pretrain_config(split_method(m)[0])[0]}.yaml").is_file()
        )
        or (split_method(m)[2] and not (SEMI_DIR / f"{split_method(m)[2]}.yaml").is_file())
    ]
    if unknown:
        raise SystemExit(
            f"unknown method(s) {unknown}: no configs/methods/<name>.yaml or configs/semi/<name>.yaml; "
            f"known: {sorted(LABELS)}, +{sorted(p.stem for p in SEMI_DIR.glob('*.yaml'))}"
        )
    if profile.needs_root and not args.root:
        raise SystemExit(f"profile {args.profile} needs --root /path/to/ACDC/training")
    if args.root and not Path(args.root).is_dir():
        raise SystemExit(f"--root {args.root}: no such folder (the ACDC training folder: patient001/, ...)")
    for flag, path in (("--out", args.out), ("--records", args.records)):
        if path and Path(path).exists() and not Path(path).is_dir():
            raise SystemExit(f"{flag} {path}: exists and is not a folder")
    common = [f"--trainer.accelerator={args.accelerator}"]
    if args.root:
        common.append(f"--data.root={args.root}")
    out = Path(args.out or REPO / "runs" / "tables" / args.profile).resolve()
    common.append(f"--data.cache_dir={out / 'cache'}")  # preprocess every volume once for all cells
    os.environ.setdefault("WANDB_MODE", "disabled")
    pretrain_root = Path(args.pretrain_from).resolve() / "pretrain" if args.pretrain_from else None
    records_dir = Path(args.records).resolve() if args.records else None
    runner = Runner(
        profile, out, common, args.pretrain_arg, args.finetune_arg, pretrain_root=pretrain_root, records_dir=records_dir
    )
    if args.pretrain_from:
        bases = {split_method(m)[0] for m in methods}
        missing = sorted(str(runner.pretrain_dir(b) / "encoder.pt") for b in bases if not runner.pretrain_done(b))
        if missing:
            raise SystemExit(
                f"--pretrain-from {args.pretrain_from}: no finished pre-training at {', '.join(missing)}; "
                "run those methods' table there first (or leave --pretrain-from out to pre-train here)"
            )
    cells = runner.cells(methods)
    runner.check_recorded_args(cells)  # a report too would mix budgets; before anything is written
    if records_dir is not None:  # the records' cells must have been run with this call's arguments as well
        Runner(profile, records_dir, common, args.pretrain_arg, args.finetune_arg).check_recorded_args(cells)
        runner.check_encoders(cells)
    out.mkdir(parents=True, exist_ok=True)
    if records_dir is not None:
        print(f"{runner.restore_records(cells)} cell record(s) restored from {records_dir}")
    t0 = time.perf_counter()
    if not args.report_only:
        provenance.append(out, provenance.record(data=f"ACDC at {args.root}" if args.root else "the built-in phantom"))
        runner.run(methods, pretrain_only=args.pretrain_only)
    runner.save_records(cells)
    print(write_results(runner, methods, args.profile, None if args.report_only else time.perf_counter() - t0))
    print(f"\nwrote {out / 'results.csv'}, {out / 'results.md'} and the Dice-vs-N figures")


if __name__ == "__main__":
    main()
