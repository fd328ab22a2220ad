#!/usr/bin/env python
"""Benchmark: local fine-tuning through the project (``SegmentationModule`` in a Lightning
Trainer) against a bare PyTorch loop around the same Lightning-free pieces, and a cell's fixed
costs itemised.

What is measured
----------------
For each arm (``supervised``, ``mean_teacher``, ``unimatch``, ``bcp``, ``bcp_halves``: the shipped
``configs/semi/*.yaml`` settings) both paths train the same U-Net (``configs/acdc/finetune.yaml``'s
features) for ``--steps`` optimiser steps on the same batches: one client's labelled (and, for a
semi-supervised arm, unlabelled) slices from the project's loader, collated once beforehand, with
the on-device augmentation applied inside the timed step by both paths. The **project** runs
``Trainer.fit`` on the module; the **bare** loop calls the augmentation, the plug-in (or the loss)
, ``backward``, ``Adam.step`` and the teacher's EMA update by hand. Reported per arm: steps/s of
both and their ratio (target >= 0.9; the first ``--warmup`` steps of each are left out of both).

Fixed costs of a cell (what a fine-tuning cell spends outside its steps): preparing the data
(cold: preprocessing every volume; warm: read back from ``--cache-dir``), one validation pass over
a client's held-out volumes, and scoring them on their native grid as ``test`` does.

A whole cell (``--cell-steps N``): one client's supervised fine-tuning as ``run_tables.py`` runs a
cell (``fcl-lightning fit`` then ``test``, fresh processes, the rate decayed poly, held-out Dice
after every 250 steps, the preprocessor's cache warm as in a table), its wall time against N steps
of the bare loop (target <= 1.3x): how much of a long cell is its steps.

    python experiments/bench_finetune.py --root /path/to/ACDC/training --steps 60
    python experiments/bench_finetune.py --steps 30            # the phantom
    python experiments/bench_finetune.py --root /path/to/ACDC/training --arms supervised --cell-steps 3000

It is a benchmark, not a test: PASS/FAIL is printed, the exit code is 0 either way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from fcl_lightning.data.acdc import ACDCSource  # noqa: E402
from fcl_lightning.data.datamodule import FederatedDataModule  # noqa: E402
from fcl_lightning.data.phantom import PhantomSource  # noqa: E402
from fcl_lightning.lit.segment import SegmentationModule  # noqa: E402
from fcl_lightning.semi import BCP, MeanTeacher, UniMatch  # noqa: E402

ARMS = {"supervised": None, "mean_teacher": MeanTeacher, "unimatch": UniMatch, "bcp": BCP, "bcp_halves": BCP}
FEATURES = [16, 32, 64, 128, 128, 128]


def plugin(arm: str):
    """The arm's plug-in with the shipped config's settings (``None``: supervised)."""
    if ARMS[arm] is None:
        return None
    cfg = yaml.safe_load((REPO / "configs" / "semi" / f"{arm}.yaml").read_text())
    return ARMS[arm](**cfg["model"]["init_args"]["semi_supervised"].get("init_args", {}))


def datamodule(root: str | None, cache: str, img_size: int) -> FederatedDataModule:
    """acdc-cpu's data (5 clients by ACDC group, a quarter held out) or the phantom."""
    source = ACDCSource(root=root) if root else PhantomSource(num_subjects=20, size=128, num_sites=2)
    return FederatedDataModule(
        source,
        num_clients=5 if root else 2,
        split="group" if root else "site",
        val_fraction=0.25,
        labelled_per_client=1,
        batch_size=8,
        img_size=img_size,
        spacing=3.5 if root else 2.0,
        augment_on="device",
        cache_dir=cache,
    )


def batches(dm: FederatedDataModule, seg: SegmentationModule, n: int) -> list[dict]:
    """``n`` collated batches of client 0's loader (cycled), before any augmentation."""
    out, loader = [], seg.train_loader(dm, 0, seed=0)
    while len(out) < n:
        for b in loader:
            out.append(b)
            if len(out) == n:
                break
    return out


class StepClock(pl.Callback):
    """Wall time of the steps after the warm-up ones."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()


def run_project(dm, arm: str, data: list[dict], warmup: int, channels_last: bool = False) -> float:
    torch.manual_seed(0)
    seg = SegmentationModule(features=FEATURES, semi_supervised=plugin(arm))
    if channels_last:
        seg = seg.to(memory_format=torch.channels_last)
    seg.attach_augment(dm)
    clock = StepClock(warmup)
    trainer = pl.Trainer(
        max_steps=len(data), max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", callbacks=[clock], num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(seg, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))  # as collated
    return (len(data) - warmup) / (clock.end - clock.start)


def run_bare(dm, arm: str, data: list[dict], warmup: int, channels_last: bool = False) -> float:
    torch.manual_seed(0)
    seg = SegmentationModule(features=FEATURES, semi_supervised=plugin(arm))
    if channels_last:
        seg = seg.to(memory_format=torch.channels_last)
    net, semi, loss_fn = seg.net, seg.semi, seg.loss_fn
    aug, u_aug = dm.batch_augment("finetune"), dm.batch_augment("unlabelled") if semi else None
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for i, b in enumerate(data):
        if i == warmup:
            start = time.perf_counter()
        image, label = aug(b["image"], b["aug_seed"], b["label"])
        if semi is None:
            loss = loss_fn(net(image), label)
        else:
            u, seed = b["u_image"].flatten(0, 1), b["u_seed"].flatten()
            u, _ = u_aug(u, seed)
            out = semi(net, loss_fn, image, label, u, seed)
            loss = out["sup"] + semi.weight_at(i) * out["unsup"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if semi is not None:
            semi.after_step(net, i)
    return (len(data) - warmup) / (time.perf_counter() - start)


def fixed_costs(root: str | None, img_size: int) -> dict[str, float]:
    """Seconds a cell spends outside its steps: data (cold and warm cache), one validation pass
    and native test scoring of client 0's held-out volumes."""
    from fcl_lightning.evaluation import evaluate_volumes
    from fcl_lightning.predict import score_native

    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for kind in ("cold", "warm"):
            t = time.perf_counter()
            dm = datamodule(root, cache, img_size)
            dm.setup()
            out[f"data_{kind}_s"] = time.perf_counter() - t
    seg = SegmentationModule(features=FEATURES)
    vols = dm.validation_volumes(0)
    t = time.perf_counter()
    evaluate_volumes(seg.net, vols, seg.eval_batch_size)
    out["validation_pass_s"] = time.perf_counter() - t
    out["validation_volumes"] = len(vols)
    t = time.perf_counter()
    score_native(seg.net, dm.preprocessor, dm.source, dm.eval_volumes(0), seg.eval_batch_size)
    out["test_native_s"] = time.perf_counter() - t
    return out


def plateau_round_steps() -> int:
    """The acdc-plateau profile's steps between held-out scores (``run_tables.py``), which a
    timed cell copies."""
    from run_tables import PROFILES

    prefix = "--federation.local_steps="
    return int(next(a for a in PROFILES["acdc-plateau"].finetune if a.startswith(prefix))[len(prefix) :])


def cell_round_steps(steps: int) -> int:
    """Steps between a timed cell's held-out scores: the plateau profile's, or the whole cell."""
    return min(steps, plateau_round_steps())


def cell_commands(root: str | None, img_size: int, steps: int, out: Path, cache: str) -> list[list[str]]:
    """The ``fcl-lightning`` argument lists of a one-client supervised cell of ``steps`` steps:
    acdc-cpu's fine-tuning settings (``run_tables.py``) on ACDC group 1 (patients 1-20), or the
    phantom's with the same model and batch; ``fit`` then ``test``."""
    from run_tables import ACDC_CPU_FINETUNE

    per_round = cell_round_steps(steps)
    if steps % per_round:
        raise SystemExit(
            f"--cell-steps {steps} is not a multiple of {per_round} (held-out Dice after every {per_round})"
        )
    if root:
        data = [*ACDC_CPU_FINETUNE, f"--data.root={root}", "--data.source.patients=1-20"]
    else:
        data = [
            "--config", "configs/demo_finetune.yaml", f"--model.features=[{','.join(map(str, FEATURES))}]",
            "--model.optimizer.init_args.lr=0.001", "--data.batch_size=8", "--data.val_fraction=0.25",
        ]  # fmt: skip
    common = [
        *data, "--data.num_clients=1", "--data.split=iid", f"--data.img_size={img_size}",
        f"--data.cache_dir={cache}", f"--trainer.default_root_dir={out}",
    ]  # fmt: skip
    train = [
        f"--federation.rounds={steps // per_round}",
        f"--federation.local_steps={per_round}",
        "--model.lr_schedule=poly",
    ]
    return [["fit", *common, *train], ["test", *common, "--ckpt_path=last"]]


def run_cell(root: str | None, img_size: int, steps: int, cache: str) -> dict[str, float]:
    """Wall seconds of each command of a cell (``cell_commands``), each in a fresh process."""
    exe = Path(sys.executable).with_name("fcl-lightning")
    out = {}
    with tempfile.TemporaryDirectory() as run:
        for argv in cell_commands(root, img_size, steps, Path(run) / "cell", cache):
            t = time.perf_counter()
            subprocess.run([str(exe), *argv], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
            out[f"{argv[0]}_s"] = time.perf_counter() - t
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="ACDC training folder (default: the phantom)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--channels-last", action="store_true", help="the U-Net's weights in channels-last memory format")
    ap.add_argument("--cell-steps", type=int, default=0, help="also time a whole supervised cell of this many steps")
    ap.add_argument("--json", default=None)
    ap.add_argument("--out", default=None, help="a folder for results.md and provenance.json (publish_results.py)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads",
        "arms": {},
    }
    report["channels_last"] = args.channels_last
    report["fixed"] = fixed_costs(args.root, args.img_size)
    with tempfile.TemporaryDirectory() as cache:
        dm = datamodule(args.root, cache, args.img_size)
        dm.setup()
        for arm in args.arms.split(","):
            data = batches(dm, SegmentationModule(features=FEATURES, semi_supervised=plugin(arm)), args.steps)
            proj = run_project(dm, arm, data, args.warmup, args.channels_last)
            bare = run_bare(dm, arm, data, args.warmup, args.channels_last)
            report["arms"][arm] = {"project_steps_s": proj, "bare_steps_s": bare, "ratio": proj / bare}
            verdict = "PASS" if proj / bare >= 0.9 else "FAIL"
            print(
                f"{arm:13s} project {proj:6.2f} steps/s ({1000 / proj:6.1f} ms)  bare {bare:6.2f} steps/s "
                f"({1000 / bare:6.1f} ms)  ratio {proj / bare:.3f} (target >= 0.9: {verdict})",
                flush=True,
            )
        if args.cell_steps:
            bare = report["arms"].get("supervised", {}).get("bare_steps_s")
            if bare is None:
                data = batches(dm, SegmentationModule(features=FEATURES), args.steps)
                bare = run_bare(dm, "supervised", data, args.warmup)
            cell = run_cell(args.root, args.img_size, args.cell_steps, cache)
            steps_s = args.cell_steps / bare
            ratio = sum(cell.values()) / steps_s
            report["cell"] = {
                "steps": args.cell_steps, "every": cell_round_steps(args.cell_steps), **cell,
                "bare_steps_total_s": steps_s, "ratio": ratio,
            }  # fmt: skip
            print(
                f"a {args.cell_steps}-step supervised cell: fit {cell['fit_s']:.1f} s + test {cell['test_s']:.1f} s "
                f"against {steps_s:.1f} s of bare steps: {ratio:.2f}x (target <= 1.3: {'PASS' if ratio <= 1.3 else 'FAIL'})",
                flush=True,
            )
    f = report["fixed"]
    print(
        f"fixed costs: data {f['data_cold_s']:.1f} s cold / {f['data_warm_s']:.1f} s from the cache; one validation "
        f"pass {f['validation_pass_s']:.2f} s ({f['validation_volumes']} volumes); native test scoring "
        f"{f['test_native_s']:.2f} s; {report['machine']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.out:
        write_results(Path(args.out), report, args)
    return 0


def write_results(out: Path, report: dict, args: argparse.Namespace) -> None:
    """``results.md`` (the table and the fixed costs) and ``provenance.json`` in ``out``."""
    import provenance

    lines = [
        f"{args.steps} optimiser steps a path ({args.warmup} warm-up steps left out), batch 8 labelled slices at "
        f"{args.img_size} px, one client{', channels-last weights' if args.channels_last else ''}; steps per second, "
        "the project's over the bare loop's (target >= 0.9).",
        "",
        "| arm | project steps/s | bare steps/s | ms a step (project) | ratio |",
        "|---|---|---|---|---|",
    ]
    for arm, r in report["arms"].items():
        lines.append(
            f"| {arm} | {r['project_steps_s']:.2f} | {r['bare_steps_s']:.2f} | {1000 / r['project_steps_s']:.0f} "
            f"| {r['ratio']:.3f} |"
        )
    f = report["fixed"]
    lines += [
        "",
        f"A cell's fixed costs: preparing the data {f['data_cold_s']:.1f} s the first time ({f['data_warm_s']:.2f} s "
        f"from the preprocessor's cache, which every cell of a table shares), one validation pass "
        f"{f['validation_pass_s']:.2f} s ({f['validation_volumes']} volumes), native test scoring of a client's "
        f"held-out volumes {f['test_native_s']:.2f} s.",
    ]
    if "cell" in report:
        c = report["cell"]
        lines += [
            "",
            f"A whole {c['steps']}-step supervised cell of one client (`fit` then `test`, fresh processes, held-out "
            f"Dice after every {c['every']} steps): {c['fit_s'] + c['test_s']:.1f} s (fit {c['fit_s']:.1f} s, "
            f"test {c['test_s']:.1f} s) against {c['bare_steps_total_s']:.1f} s for its steps in the bare loop: "
            f"**{c['ratio']:.2f}x** (target <= 1.3).",
        ]
    data = f"ACDC at {args.root}" if args.root else "the built-in phantom"
    provenance.write_results(out, "Fine-tuning throughput", "\n".join(lines), data)


if __name__ == "__main__":
    raise SystemExit(main())
