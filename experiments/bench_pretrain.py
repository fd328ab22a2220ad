#!/usr/bin/env python
"""Benchmark: FCL pre-training through the project (FederatedLoop + per-client Lightning Trainers)
against a bare PyTorch loop doing the same work, in one process, on the same data.

What is measured
----------------
The same federated pre-training (R rounds x C clients x 1 local epoch, FedAvg, feature exchange)
runs two ways:

1. **project**: ``FederatedLoop(...).run()`` with a ``ContrastivePretrainModule``, a
   ``FederatedDataModule`` and a ``Federation``, built in Python the way ``cli.py`` builds them,
   ``trainer_kwargs={"accelerator": <device>, "devices": 1}``, checkpoints written to a temp dir.
2. **bare**: a plain PyTorch loop around the project's Lightning-free model
   (``fcl.contrast.MomentumContrastModel``: nets, momentum copies, banks, ``step(batch)``),
   ``FedAvg`` and ``route``: per round and client it loads the global weights, calls ``step``
   (queries, momentum keys, the bank, ``FCLObjective``, keys enqueued), backward, Adam step and
   the momentum update (``after_step``); then FedAvg and exchange.
   Each client keeps its momentum nets, banks and Adam state across rounds, as the project does
   with ``keep_optimizer_state=True`` (the default). No checkpoints.

Data loading and augmentation are excluded from both: augmentation is OFF in both paths
(``augment_pretrain=False``, so the project's per-step loader only slices cached tensors), and the
bare loop replays batches pre-built from ``datamodule.pretrain_loader(c, client_seed(seed, r, c))``,
i.e. exactly the batches the project's client Trainers get in round r. Both paths are seeded like
``client_step``, so their round losses should agree; the difference is printed as a check that the
bare loop does the same work.

Figures
-------
* slices/s: slices processed by training steps (V*S per step, summed over all steps of the timed
  rounds) / wall time of the timed rounds (project: the whole ``FederatedLoop.run()`` call).
* ratio: project slices/s / bare slices/s (target >= 0.85).
* overhead: the project's run time (the whole ``run()`` call) not spent inside training steps, as a
  fraction of that time (target < 10%), from ``round/time/*_s`` of the loop's history plus timers in
  this script, split into: Trainer construction, fit setup (before the first step), between steps
  (batch fetch + Lightning loop glue), fit teardown (after the last step), client state swap,
  exchange (feature embedding), aggregation (FedAvg), checkpoint (copying the state and waiting for
  the previous round's background write), other loop work (metrics, routing, logging, printing),
  and what lies outside the rounds (the wait for the last checkpoint write, ``encoder.pt``). A
  background checkpoint write that slows the next round's steps shows up as slower steps, i.e. in
  the ratio, not here.
  A "step" is the window from the ``on_train_batch_start`` callback to the end of the module's
  ``on_train_batch_end`` (so it includes the momentum update), measured with a Callback and a
  timing shim on the module instance (measurement only; no project code is changed). The bare
  loop's own non-step share (exchange, FedAvg, weight loading) is printed as the floor, and
  "overhead the bare loop does not have" (overhead minus exchange and FedAvg) separately.
* step ms (mean, median, min/max) of both paths: the per-step cost of Lightning's loop and logging.
On CUDA the timers synchronise at step boundaries (in both paths), and the script reports on which
device the project's feature export ran.

Profiles
--------
* ``tiny``: phantom, 2 clients x 6 patients (12 volumes), img 64, encoder [8,16,32,64,64,64],
  demo-sized head/banks, 2 rounds: seconds, a smoke check.
* ``acdc``: the ACDC config's scale (``exchange_source: keys`` as there): 10 clients x 10 patients (20 volumes), the phantom standing in
  for ACDC (``PhantomSource(num_subjects=10*C, num_sites=C)``, ``split="site"``, ``val_fraction=0``;
  C=10 gives ``PhantomSource(num_subjects=100, num_sites=10)``), img 128 (``--img-size``), encoder
  [16,32,64,128,128,128], module defaults (head 1024 -> 128, K=512 negatives, banks 1024/4096),
  V=3 volumes x S=4 partitions per batch, 1 local epoch, ``--rounds`` (default 2).

Run
---
    python experiments/bench_pretrain.py --profile tiny
    python experiments/bench_pretrain.py --profile acdc --rounds 2
    python experiments/bench_pretrain.py --profile acdc --rounds 1 --clients 2 --device cpu --json bench.json

On a shared, busy CPU, multi-threaded torch slows down by up to ~15x whenever another process
competes for the cores, which swamps the comparison: the script warns when a path had steps over
3x its median. Use ``--repeats 3`` (alternating runs, the fastest of each path is reported) and/or
``--threads 1`` there.

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
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from rich.console import Console

from fcl_lightning.data.datamodule import FederatedDataModule
from fcl_lightning.data.phantom import PhantomSource
from fcl_lightning.fcl.aggregate import FedAvg
from fcl_lightning.fcl.contrast import MomentumContrastModel, contrast_model
from fcl_lightning.fcl.exchange import route
from fcl_lightning.fcl.memory_bank import BankEntries
from fcl_lightning.fcl.objectives import FCLObjective
from fcl_lightning.federation.client import client_seed
from fcl_lightning.federation.config import Federation
from fcl_lightning.federation.loop import FederatedLoop
from fcl_lightning.lit.pretrain import ContrastivePretrainModule
from fcl_lightning.runtime import seed_all

TARGET_RATIO = 0.85
TARGET_OVERHEAD = 0.10
V, S = 3, 4  # volumes per batch, partitions per volume
SEED = 0

PROFILES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        clients=2,
        patients_per_client=6,
        img_size=64,
        spacing=2.0,
        features=[8, 16, 32, 64, 64, 64],
        proj_hidden=256,
        proj_dim=128,
        num_negatives=256,
        local_bank=512,
        remote_bank=1024,
        rounds=2,
        exchange_source="embed",
    ),
    "acdc": dict(
        clients=10,
        patients_per_client=10,
        img_size=128,
        spacing=1.367,
        features=[16, 32, 64, 128, 128, 128],
        proj_hidden=1024,
        proj_dim=128,
        num_negatives=512,
        local_bank=1024,
        remote_bank=4096,
        rounds=2,
        exchange_source="keys",
    ),  # as configs/acdc/fcl_pretrain.yaml
}


# ------------------------------------------------------------------------------------- timing
class Clock:
    """perf_counter that first waits for the GPU when there is one to wait for."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class Meter:
    """Accumulated seconds by name, plus step / slice counts."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}
        self.steps = 0
        self.slices = 0
        self.step_times: list[float] = []
        self.export_devices: set[str] = set()  # where the project's feature export ran

    def add(self, name: str, dt: float) -> None:
        self.s[name] = self.s.get(name, 0.0) + dt

    def get(self, name: str) -> float:
        return self.s.get(name, 0.0)


class StepTimer(pl.Callback):
    """Times every training step of every client Trainer and the Lightning time around them.

    Together with the shims from :func:`instrument` it splits a client's ``fit`` into: fit setup
    (Trainer built -> first ``on_train_batch_start``), steps (``on_train_batch_start`` -> end of the
    module's ``on_train_batch_end``), between steps, and fit teardown (last step -> ``export_features``).
    """

    def __init__(self, meter: Meter, clock: Clock) -> None:
        self.meter, self.clock = meter, clock
        self.trainer_built: float | None = None  # set by the make_trainer shim
        self.step_start: float | None = None
        self.step_end: float | None = None  # end of the previous step of this fit (None: none yet)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        t = self.clock()
        if self.step_end is None:
            if self.trainer_built is not None:
                self.meter.add("fit_setup", t - self.trainer_built)
        else:
            self.meter.add("between_steps", t - self.step_end)
        self.step_start = t
        self.meter.slices += int(batch["image"].shape[0])

    def step_finished(self) -> None:  # called after the module's on_train_batch_end
        t = self.clock()
        if self.step_start is not None:
            dt = t - self.step_start
            self.meter.add("steps", dt)
            self.meter.step_times.append(dt)
            self.meter.steps += 1
        self.step_start, self.step_end = None, t


class RoundLogger:
    """The tiny logger FederatedLoop needs (``log_metrics`` + ``save``): keeps round-level metrics."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, float]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rounds.append({k: float(v) for k, v in metrics.items() if k.startswith("round")})

    def save(self) -> None:
        pass


def instrument(loop: FederatedLoop, module: ContrastivePretrainModule, meter: Meter, clock: Clock) -> StepTimer:
    """Instance-level timing shims (this script only): Trainer construction, end of each step
    (after the momentum update), feature export and the client state swap."""
    timer = StepTimer(meter, clock)
    loop.trainer_kwargs["callbacks"] = [timer]

    make_trainer = loop.make_trainer

    def timed_make_trainer():
        t0 = clock()
        trainer = make_trainer()
        t1 = clock()
        meter.add("make_trainer", t1 - t0)
        timer.trainer_built, timer.step_start, timer.step_end = t1, None, None
        return trainer

    loop.make_trainer = timed_make_trainer  # run() builds its ClientRuntime from this attribute

    on_batch_end = module.on_train_batch_end

    def timed_on_train_batch_end(outputs, batch, batch_idx):
        on_batch_end(outputs, batch, batch_idx)
        timer.step_finished()

    module.on_train_batch_end = timed_on_train_batch_end

    export = module.export_features

    def timed_export(*args, **kwargs):
        t0 = clock()
        if timer.step_end is not None:
            meter.add("fit_teardown", t0 - timer.step_end)
            timer.step_end = None
        meter.export_devices.add(module.device.type)
        out = export(*args, **kwargs)
        meter.add("exchange", clock() - t0)
        return out

    module.export_features = timed_export
    return timer


# ----------------------------------------------------------------------------------- building
def build_data(
    p: dict[str, Any], clients: int, img_size: int, cache_dir: str | None, augment_on: str = "off"
) -> FederatedDataModule:
    source = PhantomSource(num_subjects=p["patients_per_client"] * clients, num_sites=clients, seed=SEED)
    dm = FederatedDataModule(
        source=source,
        num_clients=clients,
        split="site",
        val_fraction=0.0,
        num_partitions=S,
        volumes_per_batch=V,
        spacing=p["spacing"],
        img_size=img_size,
        cache_dir=cache_dir,
        augment_pretrain=augment_on != "off",
        augment_on="device" if augment_on == "device" else "loader",
        seed=SEED,
    )
    dm.setup("fit")
    return dm


def build_module(p: dict[str, Any]) -> ContrastivePretrainModule:
    torch.manual_seed(SEED)
    return ContrastivePretrainModule(
        features=list(p["features"]),
        proj_hidden=p["proj_hidden"],
        proj_dim=p["proj_dim"],
        objective=FCLObjective(temperature=0.1, num_negatives=p["num_negatives"]),
        momentum=0.99,
        local_bank_size=p["local_bank"],
        remote_bank_size=p["remote_bank"],
        optimizer=torch.optim.Adam,
    )


# ------------------------------------------------------------------------------------ project
def run_project(
    module: ContrastivePretrainModule,
    dm: FederatedDataModule,
    rounds: int,
    device: torch.device,
    root: Path,
    console: Console,
    exchange_source: str = "embed",
    checkpoint_async: bool | None = None,
) -> dict[str, Any]:
    clock, meter, logger = Clock(device), Meter(), RoundLogger()
    loop = FederatedLoop(
        # monitor=None: the per-round probe is evaluation the bare loop does not do (a forward pass
        # over <= 40 volumes a round); the figures here are the training loop's own overhead
        federation=Federation(
            rounds=rounds,
            local_epochs=1,
            exchange=True,
            exchange_source=exchange_source,
            monitor=None,
            **({} if checkpoint_async is None else {"checkpoint_async": checkpoint_async}),
        ),
        module=module,
        datamodule=dm,
        trainer_kwargs={"accelerator": device.type, "devices": 1},
        root_dir=root,
        loggers=[logger],
        seed=SEED,
        console=console,
    )
    instrument(loop, module, meter, clock)
    t0 = clock()
    loop.run()
    wall = clock() - t0
    hist = logger.rounds
    sums = {k: sum(h[f"round/time/{k}_s"] for h in hist) for k in ("train", "aggregate", "checkpoint", "total")}
    return {
        "wall_s": wall,
        "steps": meter.steps,
        "slices": meter.slices,
        "meter": meter.s,
        "step_times": meter.step_times,
        "rounds_time": sums,
        "checkpoint_s_per_round": [h["round/time/checkpoint_s"] for h in hist],
        "losses": [h.get("round/train/loss", float("nan")) for h in hist],
        "export_devices": sorted(meter.export_devices),
    }


# --------------------------------------------------------------------------------------- bare
def bare_client(p: dict[str, Any], device: torch.device) -> tuple[MomentumContrastModel, torch.optim.Optimizer]:
    """One client of the bare loop: the project's framework-free model (its nets, momentum copies
    and banks) and its own Adam over the global nets, kept across rounds as the project keeps them."""
    model = contrast_model(
        True,
        p["local_bank"],
        p["remote_bank"],
        features=p["features"],
        norm="instance",
        proj_hidden=p["proj_hidden"],
        proj_dim=p["proj_dim"],
        objective=FCLObjective(temperature=0.1, num_negatives=p["num_negatives"]),
    ).to(device)
    return model, torch.optim.Adam([w for n, w in model.named_parameters() if not n.startswith("momentum_")])


def prebuild_batches(dm: FederatedDataModule, rounds: int) -> list[list[list[dict[str, torch.Tensor]]]]:
    """batches[r][c]: the batches the project's client c Trainer gets in round r (loader iterated once here)."""
    return [
        [list(dm.pretrain_loader(c, client_seed(SEED, r, c))) for c in range(dm.num_clients)] for r in range(rounds)
    ]


def run_bare(
    init_global: dict[str, torch.Tensor],
    p: dict[str, Any],
    dm: FederatedDataModule,
    batches: list,
    rounds: int,
    device: torch.device,
    exchange_source: str = "embed",
) -> dict[str, Any]:
    clock, meter = Clock(device), Meter()
    C, dim, m = dm.num_clients, p["proj_dim"], 0.99
    aggregator = FedAvg()
    volumes = {c: [v.image.to(device) for v in dm.train[c]] for c in range(C)}
    clients = {c: bare_client(p, device) for c in range(C)}  # built before the clock (no RNG in the rounds)
    augment = dm.batch_augment("pretrain")
    started: set[int] = set()
    inbox: dict[int, BankEntries | None] = {c: None for c in range(C)}
    global_w = {k: v.to(device) for k, v in init_global.items()}
    losses: list[float] = []

    t_run = clock()
    for r in range(rounds):
        updates, counts, round_loss = [], [], []
        payloads: dict[int, BankEntries] = {}
        for c in range(C):
            t0 = clock()
            seed_all(client_seed(SEED, r, c))
            # the draw a DataLoader iterator makes: same RNG stream as the project
            torch.empty((), dtype=torch.int64).random_()
            model, opt = clients[c]
            model.load_state_dict(global_w, strict=False)
            model.train()
            if c not in started:
                model.reset_client()
                started.add(c)
            model.receive(inbox[c])
            model.start_round()
            meter.add("state", clock() - t0)
            client_losses = []
            for batch in batches[r][c]:
                t0 = clock()
                b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                if augment is not None and "aug_seed" in b:  # data.augment_on: device, as the project does it
                    b["image"], _ = augment(b["image"], b.pop("aug_seed"))
                    if "aug_seed_k" in b:
                        b["image_k"], _ = augment(b["image_k"], b.pop("aug_seed_k"))
                out = model.step(b)
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                opt.step()
                model.after_step(m)
                client_losses.append(out["loss"].detach())
                dt = clock() - t0
                meter.add("steps", dt)
                meter.step_times.append(dt)
                meter.steps += 1
                meter.slices += int(b["image"].shape[0])
            t0 = clock()
            updates.append({k: v.detach().clone() for k, v in model.state_dict().items() if k in global_w})
            counts.append(dm.num_train_samples(c))
            round_loss.append(float(torch.stack(client_losses).mean()))
            meter.add("state", clock() - t0)
            t0 = clock()
            g = torch.Generator().manual_seed(client_seed(SEED, r, c) + 1)
            payloads[c] = model.shared_features(volumes[c], dm.num_partitions, c, None, g, exchange_source)
            meter.add("exchange", clock() - t0)
        t0 = clock()
        global_w = aggregator(updates, counts)
        meter.add("aggregate", clock() - t0)
        t0 = clock()
        inbox = route(payloads, dim, recipients=range(C))
        meter.add("exchange", clock() - t0)
        losses.append(sum(loss * n for loss, n in zip(round_loss, counts)) / sum(counts))
    wall = clock() - t_run
    return {
        "wall_s": wall,
        "steps": meter.steps,
        "slices": meter.slices,
        "meter": meter.s,
        "step_times": meter.step_times,
        "losses": losses,
    }


# ---------------------------------------------------------------------------------------- main
def pct(x: float, total: float) -> str:
    return f"{100 * x / total:5.1f}%" if total > 0 else "  n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for what is measured.",
    )
    ap.add_argument("--profile", choices=sorted(PROFILES), default="tiny")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default: the profile's, 2)")
    ap.add_argument(
        "--clients", type=int, default=None, help="clients C (each keeps the profile's patients per client)"
    )
    ap.add_argument("--img-size", type=int, default=None, help="in-plane size (default: 64 tiny, 128 acdc)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one untimed warm-up round per path first (default: on)",
    )
    ap.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    ap.add_argument("--cache-dir", default=None, help="on-disk cache of preprocessed phantom volumes")
    ap.add_argument("--root", type=Path, default=None, help="keep the project's checkpoints here (default: a temp dir)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed runs per path, alternating project/bare; the fastest of each is reported (default 1)",
    )
    ap.add_argument(
        "--exchange-source",
        choices=["embed", "keys"],
        default=None,
        help="federation.exchange_source of both paths (default: the profile's; acdc: keys, as the ACDC "
        "config; embed: an extra pass over every slice after the round)",
    )
    ap.add_argument(
        "--checkpoint-async",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="federation.checkpoint_async of the project run (default: the project's default)",
    )
    ap.add_argument(
        "--augment-on",
        choices=["off", "loader", "device"],
        default="off",
        help="pre-training augmentation of both paths: off (the default: steps only), loader (MONAI per "
        "sample, in the project's DataLoader; the bare loop replays the augmented batches), device "
        "(BatchAugment on the training device in both paths)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's); 1 is far less sensitive to a busy shared CPU",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    p = dict(PROFILES[args.profile])
    C = args.clients or p["clients"]
    R = args.rounds or p["rounds"]
    img = args.img_size or p["img_size"]
    args.exchange_source = args.exchange_source or p["exchange_source"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda but CUDA is not available", file=sys.stderr)
        return 0
    console = Console(stderr=True)

    t0 = time.perf_counter()
    dm = build_data(p, C, img, args.cache_dir, args.augment_on)
    vols = [dm.num_train_samples(c) for c in range(C)]
    print(
        f"data: {C} clients x {vols[0]} volumes (phantom, {p['patients_per_client'] * C} patients, "
        f"{C} sites), img {img}, prepared in {time.perf_counter() - t0:.1f} s (not timed)",
        file=sys.stderr,
    )
    pristine = build_module(p)  # every project run starts from a copy of it, the bare runs from its weights
    init_global = {k: v.cpu().clone() for k, v in pristine.global_state().items()}
    batches = prebuild_batches(dm, R)

    tmp = tempfile.TemporaryDirectory(prefix="fcl-bench-")
    root = args.root or Path(tmp.name)
    load_before = os.getloadavg()
    if args.warmup:
        print("warm-up: project (1 round, untimed) ...", file=sys.stderr)
        run_project(
            copy.deepcopy(pristine),
            dm,
            1,
            device,
            Path(tmp.name) / "warmup",
            console,
            args.exchange_source,
            args.checkpoint_async,
        )
        print("warm-up: bare (1 round, untimed) ...", file=sys.stderr)
        run_bare(init_global, p, dm, batches[:1], 1, device, args.exchange_source)

    proj_runs, bare_runs = [], []
    for i in range(max(1, args.repeats)):
        print(f"timed {i + 1}/{args.repeats}: project ({R} round(s)) ...", file=sys.stderr)
        run_root = root / f"project-{i}"
        proj_runs.append(
            run_project(
                copy.deepcopy(pristine), dm, R, device, run_root, console, args.exchange_source, args.checkpoint_async
            )
        )
        if args.root is None:
            shutil.rmtree(run_root, ignore_errors=True)  # checkpoints can be large; keep disk use flat
        print(f"timed {i + 1}/{args.repeats}: bare ({R} round(s)) ...", file=sys.stderr)
        bare_runs.append(run_bare(init_global, p, dm, batches, R, device, args.exchange_source))
    tmp.cleanup()
    load_after = os.getloadavg()
    proj = min(proj_runs, key=lambda r: r["wall_s"])
    bare = min(bare_runs, key=lambda r: r["wall_s"])

    # ------------------------------------------------------------------------------- figures
    sps_p = proj["slices"] / proj["wall_s"]
    sps_b = bare["slices"] / bare["wall_s"]
    ratio = sps_p / sps_b
    rt, pm = proj["rounds_time"], proj["meter"]
    # the whole run() call: the rounds, plus what lies outside them (the wait for the last
    # background checkpoint write, encoder.pt, summary.json), counted as overhead too
    total = proj["wall_s"]
    step_s = pm.get("steps", 0.0)
    parts = {
        "trainer_construction": pm.get("make_trainer", 0.0),
        "fit_setup": pm.get("fit_setup", 0.0),
        "between_steps": pm.get("between_steps", 0.0),
        "fit_teardown": pm.get("fit_teardown", 0.0),
        "exchange": pm.get("exchange", 0.0),
    }
    parts["client_state_swap"] = rt["train"] - step_s - sum(parts.values())
    parts["aggregation"] = rt["aggregate"]
    parts["checkpoint"] = rt["checkpoint"]
    parts["other_loop"] = rt["total"] - rt["train"] - rt["aggregate"] - rt["checkpoint"]
    parts["outside_rounds"] = total - rt["total"]
    overhead_s = total - step_s
    overhead = overhead_s / total
    trainer_setup_teardown = sum(
        parts[k] for k in ("trainer_construction", "fit_setup", "between_steps", "fit_teardown", "client_state_swap")
    )
    bm = bare["meter"]
    bare_non_step = bare["wall_s"] - bm.get("steps", 0.0)
    loss_diff = max((abs(a - b) for a, b in zip(proj["losses"], bare["losses"])), default=float("nan"))
    ok_ratio, ok_over = ratio >= TARGET_RATIO, overhead < TARGET_OVERHEAD
    ms = lambda xs: 1000 * sum(xs) / max(1, len(xs))  # noqa: E731
    med = lambda xs: 1000 * statistics.median(xs) if xs else float("nan")  # noqa: E731
    noisy = [
        name
        for name, r in (("project", proj), ("bare", bare))
        if r["step_times"] and max(r["step_times"]) > 3 * statistics.median(r["step_times"])
    ]
    if proj["step_times"] and bare["step_times"] and not noisy:
        q = statistics.median(proj["step_times"]) / statistics.median(bare["step_times"])
        if not 1 / 2 < q < 2:  # the same step cannot legitimately differ this much
            noisy = ["project" if q > 1 else "bare"]

    out = []
    w = out.append
    w("")
    w(
        f"FCL pre-training benchmark: profile {args.profile}, {C} clients x {vols[0]} volumes, img {img}, "
        f"encoder {p['features']}, head {p['proj_hidden']}->{p['proj_dim']}, K={p['num_negatives']}"
    )
    w(
        f"  V={V} volumes x S={S} partitions = {V * S} slices/step, 1 local epoch, {R} timed round(s), "
        f"warm-up {'on' if args.warmup else 'off'}, exchange source {args.exchange_source}, device {device.type} "
        f"({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}, lightning {lightning.__version__}"
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
    w(f"{'step ms: mean':34}{ms(proj['step_times']):>12.1f}{ms(bare['step_times']):>12.1f}")
    w(
        f"{'         median':34}{med(proj['step_times']):>12.1f}{med(bare['step_times']):>12.1f}"
        f"   project/bare {med(proj['step_times']) / med(bare['step_times']):.3f}"
    )
    w(
        f"{'         min / max':34}{1000 * min(proj['step_times']):>5.0f} /{1000 * max(proj['step_times']):>5.0f}"
        f"{1000 * min(bare['step_times']):>5.0f} /{1000 * max(bare['step_times']):>5.0f}"
    )
    w(f"{'slices/s':34}{sps_p:>12.1f}{sps_b:>12.1f}")
    w(
        f"{'last round loss':34}{proj['losses'][-1]:>12.5f}{bare['losses'][-1]:>12.5f}   max |diff| over rounds {loss_diff:.2e}"
    )
    if len(proj_runs) > 1:
        walls_p = " ".join(f"{r['wall_s']:.2f}" for r in proj_runs)
        walls_b = " ".join(f"{r['wall_s']:.2f}" for r in bare_runs)
        w(f"{'wall of each repeat (s)':34}{walls_p:>12}{walls_b:>12}   (fastest reported)")
    w(f"  load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after, {os.cpu_count()} CPUs")
    if noisy:
        w(
            f"  WARNING: {', '.join(noisy)} step times look disturbed (a step > 3x the median, or a project/bare median "
            "ratio outside 0.5-2): the machine was busy (other processes?); timings are unreliable, "
            "rerun with --repeats 3 and/or --threads 1 on a quiet machine"
        )
    if device.type == "cuda" and proj["export_devices"] != ["cuda"]:
        w(
            f"  NOTE: the project's feature export (export_features) ran on {'/'.join(proj['export_devices'])}, not cuda: "
            "Lightning's Strategy.teardown moves the module to the CPU at the end of every fit, before client_step exports"
        )
    if proj["slices"] != bare["slices"]:
        w("  WARNING: the two paths processed different numbers of slices")
    w("")
    w(
        f"project rounds per minute   : {60 * R / proj['wall_s']:6.2f}   ({C} clients x {vols[0]} volumes, {img} px, "
        f"1 local epoch a round, augmentation {args.augment_on})"
    )
    w(f"ratio project/bare slices/s : {ratio:6.3f}   target >= {TARGET_RATIO:.2f}   {'PASS' if ok_ratio else 'FAIL'}")
    w(
        f"project overhead            : {100 * overhead:5.1f}%   target <  {100 * TARGET_OVERHEAD:.0f}%   {'PASS' if ok_over else 'FAIL'}"
        f"   ({overhead_s:.2f} s of {total:.2f} s round time not in training steps)"
    )
    w("")
    w(f"project run time ({R} round(s) + finishing): {total:.2f} s")
    w(f"  {'training steps':44}{step_s:8.2f} s {pct(step_s, total)}")
    w(f"  {'overhead':44}{overhead_s:8.2f} s {pct(overhead_s, total)}")
    w(
        f"    {'trainer setup+teardown (sum of the next 5)':42}{trainer_setup_teardown:8.2f} s {pct(trainer_setup_teardown, total)}"
    )
    labels = {
        "trainer_construction": "Trainer construction (make_trainer)",
        "fit_setup": "fit setup (Trainer built -> first step)",
        "between_steps": "between steps (batch fetch + loop glue)",
        "fit_teardown": "fit teardown (last step -> exchange)",
        "client_state_swap": "client state swap + rest of client_step",
        "exchange": "exchange (feature embedding)",
        "aggregation": "aggregation (FedAvg)",
        "checkpoint": "checkpoint",
        "other_loop": "other loop work (metrics, route, log)",
        "outside_rounds": "outside rounds (last checkpoint, encoder.pt)",
    }
    for k, label in labels.items():
        ind = (
            "      "
            if k in ("trainer_construction", "fit_setup", "between_steps", "fit_teardown", "client_state_swap")
            else "    "
        )
        w(f"{ind}{label:{46 - len(ind)}}{parts[k]:8.2f} s {pct(parts[k], total)}")
    proj_only = overhead_s - parts["exchange"] - parts["aggregation"]
    w(
        f"  {'overhead the bare loop does not have':44}{proj_only:8.2f} s {pct(proj_only, total)}   (overhead minus exchange and FedAvg)"
    )
    w(
        f"bare loop non-step time: {bare_non_step:.2f} s of {bare['wall_s']:.2f} s = {pct(bare_non_step, bare['wall_s']).strip()} "
        f"(exchange {bm.get('exchange', 0.0):.2f} s, FedAvg {bm.get('aggregate', 0.0):.2f} s, "
        f"weights/banks {bm.get('state', 0.0):.2f} s; no checkpoint)"
    )
    print("\n".join(out), flush=True)

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
            "rounds_per_minute": 60 * R / proj["wall_s"],
            "project": {k: v for k, v in proj.items() if k != "step_times"},
            "bare": {k: v for k, v in bare.items() if k != "step_times"},
            "slices_per_s": {"project": sps_p, "bare": sps_b},
            "ratio": ratio,
            "overhead": overhead,
            "overhead_breakdown_s": parts,
            "overhead_not_in_bare_s": proj_only,
            "round_total_s": total,
            "step_s": step_s,
            "loss_max_abs_diff": loss_diff,
            "targets": {"ratio": TARGET_RATIO, "overhead": TARGET_OVERHEAD},
            "repeats_wall_s": {"project": [r["wall_s"] for r in proj_runs], "bare": [r["wall_s"] for r in bare_runs]},
            "step_ms_median": {"project": med(proj["step_times"]), "bare": med(bare["step_times"])},
            "threads": torch.get_num_threads(),
            "loadavg": {"before": load_before, "after": load_after},
            "pass": {"ratio": ok_ratio, "overhead": ok_over},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
