#!/usr/bin/env python
"""Benchmark: FCL pre-training through the project (FederatedLoop + per-client Lightning Trainers)
against a bare PyTorch loop doing the same work, in one process, on the same data.

What is measured
----------------
The same federated pre-training (R rounds x C clients x 1 local epoch or ``--local-steps``, FedAvg, feature exchange)
runs through ``FederatedLoop(...).run()`` (**project**) and through a plain PyTorch loop around the
project's Lightning-free ``fcl.contrast.MomentumContrastModel`` (**bare**), seeded alike, so their
round losses agree (printed as the check that the bare loop does the same work). Data loading and,
by default, augmentation are excluded from both. Reported: slices/s of both paths and their ratio
(target >= 0.95), the project's overhead (run time outside training steps, target <= 5%) split into
Trainer construction, fit setup, between steps, fit teardown, client state swap, exchange, FedAvg,
checkpoint, other loop work and what lies outside the rounds, the bare loop's non-step time (the
floor), and step ms of both paths. The machinery and the exact definitions are in
``experiments/bench_harness.py`` (its docstring); this script runs the two paths and prints the report.

Profiles
--------
* ``tiny``: phantom, 2 clients x 6 patients (12 volumes), img 64, encoder [8,16,32,64,64,64],
  demo-sized head/banks, 2 rounds: seconds, a smoke check.
* ``acdc``: the ACDC config's scale (``exchange_source: keys`` as there): 10 clients x 10 patients (20 volumes), the phantom standing in
  for ACDC (``PhantomSource(num_subjects=10*C, num_sites=C)``, ``split="site"``, ``val_fraction=0``;
  C=10 gives ``PhantomSource(num_subjects=100, num_sites=10)``), img 128 (``--img-size``), encoder
  [16,32,64,128,128,128], module defaults (head 1024 -> 128, K=512 negatives, banks 1024/4096),
  V=3 volumes x S=4 partitions per batch, 1 local epoch (6 steps a client round), ``--rounds``
  (default 2). The ACDC config trains 40 steps a client round (``federation.local_steps``):
  ``--local-steps 40`` runs its rounds (110 s each here instead of 15 s, so the per-round costs,
  the checkpoint above all, weigh 6.7x less).

Run
---
    python experiments/bench_pretrain.py --profile tiny
    python experiments/bench_pretrain.py --profile acdc --rounds 2
    python experiments/bench_pretrain.py --profile acdc --clients 10 --threads 2 --repeats 2 --rounds 2 --local-steps 40
    python experiments/bench_pretrain.py --profile acdc --rounds 1 --clients 2 --device cpu --json bench.json
    python experiments/bench_pretrain.py --profile acdc --clients 10 --threads 2 --rounds 2 --local-steps 40 \\
        --out runs/bench_pretrain   # then publish_results.py runs/bench_pretrain docs/results/...

On a shared, busy CPU, multi-threaded torch slows down by up to ~15x whenever another process
competes for the cores, which swamps the comparison: the script warns when a path had steps over
3x its median. Use ``--repeats 3`` (alternating runs, the fastest of each path is reported, and
each repeat's pair: the median of bare/project wall over the repeats, which a machine whose speed
drifts between runs disturbs less) and/or ``--threads 1`` there.

Data preprocessing (phantom generation, ~0.5 s per patient on one core, so about a minute for the
full ACDC scale) happens once before any timing; ``--cache-dir`` keeps it on disk between runs.
It is a benchmark, not a test: PASS/FAIL is printed, and the exit code is 0 either way.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning
import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this script (not in the wheel)
import bench_harness as fb  # noqa: E402

#: ``federation.*`` settings of the project run the command line may set (absent: the project's default)
FEDERATION_OPTIONS = ("checkpoint_async", "reuse_trainers", "checkpoint_every", "local_steps")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="What is measured: the docstrings of this script and of experiments/bench_harness.py.",
    )
    ap.add_argument("--profile", choices=sorted(fb.PROFILES), default="tiny")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default: the profile's, 2)")
    ap.add_argument(
        "--clients", type=int, default=None, help="clients C (each keeps the profile's patients per client)"
    )
    ap.add_argument("--img-size", type=int, default=None, help="in-plane size (default: 64 tiny, 128 acdc)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True, help="untimed warm-up round")
    ap.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    ap.add_argument(
        "--out", type=Path, default=None, help="a folder for results.md + provenance.json (publish_results.py)"
    )
    ap.add_argument("--cache-dir", default=None, help="on-disk cache of preprocessed phantom volumes")
    ap.add_argument("--root", type=Path, default=None, help="keep the project's checkpoints here (default: a temp dir)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed runs per path, project/bare then bare/project ...; the fastest of each is reported (default 1)",
    )
    ap.add_argument(
        "--exchange-source",
        choices=["embed", "keys"],
        default=None,
        help="federation.exchange_source of both paths (default: the profile's; acdc: keys, as the ACDC "
        "config; embed: an extra pass over every slice after the round)",
    )
    for name in ("checkpoint_async", "reuse_trainers"):  # --checkpoint-async, --no-reuse-trainers, ...
        help_ = f"federation.{name} of the project run (default: the project's default)"
        ap.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction, help=help_)
    ap.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="federation.checkpoint_every of the project run (default 1: a checkpoint every round)",
    )
    ap.add_argument(
        "--local-steps",
        type=int,
        default=None,
        help="federation.local_steps of both paths: optimiser steps a client round (default: 1 local epoch, "
        "6 steps at acdc; the ACDC config's is 40)",
    )
    ap.add_argument(
        "--augment-on",
        choices=["off", "loader", "device"],
        default="off",
        help="pre-training augmentation of both paths: off (the default: steps only), loader (MONAI per "
        "sample, in the project's DataLoader; the bare loop replays the augmented batches), device "
        "(BatchAugment on the training device in both paths)",
    )
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (1 is less sensitive to a busy CPU)")
    ap.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true", help="both paths")
    ap.add_argument("--volumes-on", choices=["cpu", "device"], default="cpu", help="data.volumes_on (project)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    p = dict(fb.PROFILES[args.profile])
    C = args.clients or p["clients"]
    R = args.rounds or p["rounds"]
    img = args.img_size or p["img_size"]
    args.exchange_source = args.exchange_source or p["exchange_source"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda but CUDA is not available", file=sys.stderr)
        return 0
    console = Console(stderr=True)
    local = f"{args.local_steps} local steps" if args.local_steps else "1 local epoch"

    t0 = time.perf_counter()
    dm = fb.build_data(p, C, img, args.cache_dir, args.augment_on, args.volumes_on)
    vols = [dm.num_train_samples(c) for c in range(C)]
    print(
        f"data: {C} clients x {vols[0]} volumes (phantom, {p['patients_per_client'] * C} patients, "
        f"{C} sites), img {img}, prepared in {time.perf_counter() - t0:.1f} s (not timed)",
        file=sys.stderr,
    )
    pristine = fb.build_module(p)  # every project run starts from a copy of it, the bare runs from its weights
    init_global = {k: v.cpu().clone() for k, v in pristine.global_state().items()}
    batches = fb.prebuild_batches(dm, R, args.local_steps)

    tmp = tempfile.TemporaryDirectory(prefix="fcl-bench-")
    root = args.root or Path(tmp.name)
    load_before = os.getloadavg()

    def project(rounds: int, run_root: Path) -> dict[str, Any]:
        fed = {k: v for k in FEDERATION_OPTIONS if (v := getattr(args, k)) is not None}
        module, source = copy.deepcopy(pristine), args.exchange_source
        return fb.run_project(module, dm, rounds, device, run_root, console, source, fed, args.precision)

    if args.warmup:
        print("warm-up: project (1 round, untimed) ...", file=sys.stderr)
        project(1, Path(tmp.name) / "warmup")
        print("warm-up: bare (1 round, untimed) ...", file=sys.stderr)
        fb.run_bare(init_global, p, dm, batches[:1], 1, device, args.exchange_source, args.precision)

    proj_runs, bare_runs = [], []

    def timed_project(i: int) -> None:
        print(f"timed {i + 1}/{args.repeats}: project ({R} round(s)) ...", file=sys.stderr)
        proj_runs.append(project(R, root / f"project-{i}"))
        if args.root is None:
            shutil.rmtree(root / f"project-{i}", ignore_errors=True)  # checkpoints can be large

    def timed_bare(i: int) -> None:
        print(f"timed {i + 1}/{args.repeats}: bare ({R} round(s)) ...", file=sys.stderr)
        bare_runs.append(fb.run_bare(init_global, p, dm, batches, R, device, args.exchange_source, args.precision))

    for i in range(max(1, args.repeats)):  # project first in odd repeats, bare first in even ones
        for run in (timed_project, timed_bare) if i % 2 == 0 else (timed_bare, timed_project):
            run(i)
    tmp.cleanup()
    load_after = os.getloadavg()
    proj = min(proj_runs, key=lambda r: r["wall_s"])
    bare = min(bare_runs, key=lambda r: r["wall_s"])

    # ------------------------------------------------------------------------------- figures
    f = fb.figures(proj, bare)
    sps_p, sps_b = f["slices_per_s"]["project"], f["slices_per_s"]["bare"]
    ratio, overhead, overhead_s, parts = f["ratio"], f["overhead"], f["overhead_s"], f["overhead_breakdown_s"]
    total, step_s, bm = f["round_total_s"], f["step_s"], bare["meter"]
    ms, med, pct, pt, bt = fb.mean_ms, fb.median_ms, fb.pct, proj["step_times"], bare["step_times"]

    out = []
    w = out.append
    w("")
    w(
        f"FCL pre-training benchmark: profile {args.profile}, {C} clients x {vols[0]} volumes, img {img}, "
        f"encoder {p['features']}, head {p['proj_hidden']}->{p['proj_dim']}, K={p['num_negatives']}"
    )
    w(
        f"  V={fb.V} volumes x S={fb.S} partitions = {fb.V * fb.S} slices/step, {local}, {R} timed round(s), "
        f"warm-up {'on' if args.warmup else 'off'}, exchange source {args.exchange_source}, device {device.type} "
        f"({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}, lightning {lightning.__version__}, "
        f"precision {args.precision}, volumes on {args.volumes_on}"
    )
    w(
        "  augmentation OFF in both paths (augment_pretrain=False; the bare loop replays the same batches from memory)"
        if args.augment_on == "off"
        else f"  augmentation ON ({args.augment_on}); the bare loop replays the project's batches"
        + (" and augments them on the device too" if args.augment_on == "device" else ", already augmented")
    )
    w("")
    w(f"{'':34}{'project':>12}{'bare':>12}")
    w(f"{'optimizer steps':34}{proj['steps']:>12d}{bare['steps']:>12d}")
    w(f"{'slices (V*S per step)':34}{proj['slices']:>12d}{bare['slices']:>12d}")
    w(f"{'wall time of timed rounds (s)':34}{proj['wall_s']:>12.2f}{bare['wall_s']:>12.2f}")
    w(f"{'  of which in training steps (s)':34}{step_s:>12.2f}{bm.get('steps', 0.0):>12.2f}")
    w(f"{'step ms: mean':34}{ms(pt):>12.1f}{ms(bt):>12.1f}")
    w(f"{'         median':34}{med(pt):>12.1f}{med(bt):>12.1f}   project/bare {med(pt) / med(bt):.3f}")
    w(
        f"{'         min / max':34}{1000 * min(pt):>5.0f} /{1000 * max(pt):>5.0f}"
        f"{1000 * min(bt):>5.0f} /{1000 * max(bt):>5.0f}"
    )
    w(f"{'slices/s':34}{sps_p:>12.1f}{sps_b:>12.1f}")
    w(
        f"{'last round loss':34}{proj['losses'][-1]:>12.5f}{bare['losses'][-1]:>12.5f}   max |diff| over rounds {f['loss_max_abs_diff']:.2e}"
    )
    paired = fb.paired_ratios(proj_runs, bare_runs)
    if len(proj_runs) > 1:
        walls_p = " ".join(f"{r['wall_s']:.2f}" for r in proj_runs)
        walls_b = " ".join(f"{r['wall_s']:.2f}" for r in bare_runs)
        w(f"{'wall of each repeat (s)':34}project {walls_p} | bare {walls_b}   (fastest reported)")
    w(f"  load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after, {os.cpu_count()} CPUs")
    if f["disturbed"]:
        w(
            f"  WARNING: {', '.join(f['disturbed'])} step times look disturbed (a step > 3x the median, or a project/bare median "
            "ratio outside 0.5-2): the machine was busy (other processes?); timings are unreliable, "
            "rerun with --repeats 3 and/or --threads 1 on a quiet machine"
        )
    if device.type == "cuda" and proj["export_devices"] != ["cuda"]:
        w(
            f"  NOTE: the project's feature export (export_features) ran on {'/'.join(proj['export_devices'])}, not cuda: "
            "the client Trainers did not keep the module on the device (fcl_lightning.runtime.ResidentStrategy)"
        )
    if proj["slices"] != bare["slices"]:
        w("  WARNING: the two paths processed different numbers of slices")
    w("")
    w(
        f"project rounds per minute   : {60 * R / proj['wall_s']:6.2f}   ({C} clients x {vols[0]} volumes, {img} px, "
        f"{local} a round, augmentation {args.augment_on})"
    )
    paper_min = 50 * 100 * C * fb.V * fb.S / sps_p / 60  # issue 13: 50 rounds x 100 steps a client
    w(f"paper run at this rate       : {paper_min:6.1f} min (50 rounds x 100 steps x {C} clients, estimated)")
    w(
        f"ratio project/bare slices/s : {ratio:6.3f}   target >= {fb.TARGET_RATIO:.2f}   {'PASS' if f['pass']['ratio'] else 'FAIL'}"
    )
    if len(proj_runs) > 1:
        pairs = " ".join(f"{q:.3f}" for q in paired["pairs"])
        w(f"  paired (each repeat's runs) : {paired['median']:6.3f}   median of {pairs}")
    w(
        f"project overhead            : {100 * overhead:5.1f}%   target <= {100 * fb.TARGET_OVERHEAD:.0f}%   {'PASS' if f['pass']['overhead'] else 'FAIL'}"
        f"   ({overhead_s:.2f} s of {total:.2f} s round time not in training steps)"
    )
    w("")
    w(f"project run time ({R} round(s) + finishing): {total:.2f} s")
    w(f"  {'training steps':44}{step_s:8.2f} s {pct(step_s, total)}")
    w(f"  {'overhead':44}{overhead_s:8.2f} s {pct(overhead_s, total)}")
    tst = f["trainer_setup_teardown_s"]
    w(f"    {'trainer setup+teardown (sum of the next 5)':42}{tst:8.2f} s {pct(tst, total)}")
    for k, label in fb.PART_LABELS.items():
        ind = "      " if k in fb.TRAINER_PARTS else "    "
        w(f"{ind}{label:{46 - len(ind)}}{parts[k]:8.2f} s {pct(parts[k], total)}")
    proj_only, bare_non_step = f["overhead_not_in_bare_s"], f["bare_non_step_s"]
    w(
        f"  {'overhead the bare loop does not have':44}{proj_only:8.2f} s {pct(proj_only, total)}   (overhead minus exchange and FedAvg)"
    )
    w(
        f"bare loop non-step time: {bare_non_step:.2f} s of {bare['wall_s']:.2f} s = {pct(bare_non_step, bare['wall_s']).strip()} "
        f"(exchange {bm.get('exchange', 0.0):.2f} s, FedAvg {bm.get('aggregate', 0.0):.2f} s, "
        f"weights/banks {bm.get('state', 0.0):.2f} s; no checkpoint)"
    )
    print("\n".join(out), flush=True)
    if args.out:
        import provenance

        body = "The project's pre-training against a bare PyTorch loop doing the same work:\n\n```text\n"
        body += "\n".join(out) + "\n```"
        call = None if argv is None else ["experiments/bench_pretrain.py", *argv]  # else this process's
        data = f"the phantom at the {args.profile} profile's scale"
        provenance.write_results(args.out, "Pre-training throughput", body, data, argv=call)
        print(f"wrote {args.out / 'results.md'}", file=sys.stderr)

    if args.json:
        result = {
            "profile": args.profile,
            "exchange_source": args.exchange_source,
            "clients": C,
            "rounds": R,
            "img_size": img,
            "device": device.type,
            "volumes_per_client": vols,
            "features": p["features"],
            "warmup": args.warmup,
            "augmentation": args.augment_on,
            **{k: getattr(args, k) for k in ("precision", "volumes_on", *FEDERATION_OPTIONS)},
            "rounds_per_minute": 60 * R / proj["wall_s"],
            "paper_run_min_estimate": paper_min,
            "project": {k: v for k, v in proj.items() if k != "step_times"},
            "bare": {k: v for k, v in bare.items() if k != "step_times"},
            **{k: f[k] for k in ("slices_per_s", "ratio", "overhead", "overhead_breakdown_s")},
            **{k: f[k] for k in ("overhead_not_in_bare_s", "round_total_s", "step_s", "loss_max_abs_diff")},
            "targets": {"ratio": fb.TARGET_RATIO, "overhead": fb.TARGET_OVERHEAD},
            "repeats_wall_s": {"project": [r["wall_s"] for r in proj_runs], "bare": [r["wall_s"] for r in bare_runs]},
            "ratio_paired": paired,
            "step_ms_median": {"project": med(pt), "bare": med(bt)},
            "threads": torch.get_num_threads(),
            "loadavg": {"before": load_before, "after": load_after},
            "pass": f["pass"],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
