"""Throughput benchmark of federated pre-training: the project's loop against a bare PyTorch loop
doing the same work, in one process, on the same data (``experiments/bench_pretrain.py`` runs it
and prints the report).

What is measured
----------------
The same federated pre-training (R rounds x C clients x 1 local epoch, FedAvg, feature exchange)
runs two ways:

1. **project** (:func:`run_project`): ``FederatedLoop(...).run()`` with a
   ``ContrastivePretrainModule``, a ``FederatedDataModule`` and a ``Federation``, built in Python
   the way ``cli.py`` builds them, ``trainer_kwargs={"accelerator": <device>, "devices": 1}``,
   checkpoints written to a temp dir.
2. **bare** (:func:`run_bare`): a plain PyTorch loop around the project's Lightning-free model
   (``fcl.contrast.MomentumContrastModel``: nets, momentum copies, banks, ``step(batch)``),
   ``FedAvg`` and ``route``: per round and client it loads the global weights, calls ``step``
   (queries, momentum keys, the bank, ``FCLObjective``, keys enqueued), backward, Adam step and
   the momentum update (``after_step``); then FedAvg and exchange. Each client keeps its momentum
   nets, banks and Adam state across rounds, as the project does with ``keep_optimizer_state=True``
   (the default). No checkpoints.

Data loading is excluded from both: with augmentation off (``augment_pretrain=False``) the
project's per-step loader only slices cached tensors, and the bare loop replays batches pre-built
from ``datamodule.pretrain_loader(c, client_seed(seed, r, c))`` (:func:`prebuild_batches`), i.e.
exactly the batches the project's client Trainers get in round r. Both paths are seeded like
``client_step``, so their round losses agree: the check that the bare loop does the same work.

Figures
-------
* slices/s: slices processed by training steps (V*S per step, summed over all steps of the timed
  rounds) / wall time of the timed rounds (project: the whole ``FederatedLoop.run()`` call).
* ratio: project slices/s / bare slices/s (target >= :data:`TARGET_RATIO`).
* overhead: the project's run time not spent inside training steps, as a fraction of that time
  (target <= :data:`TARGET_OVERHEAD`), from ``round/time/*_s`` of the loop's history plus the timers
  of :func:`instrument`, split by :func:`overhead_parts` into :data:`PART_LABELS`. A background
  checkpoint write that slows the next round's steps shows up as slower steps, i.e. in the ratio.
  A "step" is the window from the ``on_train_batch_start`` callback to the end of the module's
  ``on_train_batch_end`` (so it includes the momentum update), measured with :class:`StepTimer`
  and a timing shim on the module instance (measurement only; no project code is changed).
* step ms (mean, median, min/max) of both paths: the per-step cost of Lightning's loop and logging.
* paired ratios (:func:`paired_ratios`, with ``--repeats`` > 1): repeat i's project run against
  the bare run beside it (bare wall / project wall), and their median. Where the machine's speed
  drifts between runs (on the 2-core CPU by up to 40% over a few minutes), the ratio of the
  fastest runs compares a fast moment of one path with a slow one of the other; a pair shares
  its moment, so the pairs say how far the gap is the project's.

On CUDA the timers synchronise at step boundaries (:class:`Clock`, in both paths), and the meter
records on which device the project's feature export ran.
"""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path
from typing import Any

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

TARGET_RATIO = 0.95  # project slices/s over bare slices/s (issue 13's CPU target; on a GPU it asks 0.9)
TARGET_OVERHEAD = 0.05  # share of the project's run time outside training steps (issue 13)
V, S = 3, 4  # volumes per batch, partitions per volume
SEED = 0
MOMENTUM = 0.99

#: Benchmark scales. ``acdc`` is configs/acdc/fcl_pretrain.yaml's, the phantom standing in for ACDC.
#: An optional ``phantom`` dict is passed to ``PhantomSource`` (tests use smaller phantoms).
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
    ),
}

#: The overhead parts of :func:`overhead_parts` in report order, with their labels; the first five
#: are the Trainer's setup and teardown (:data:`TRAINER_PARTS`).
PART_LABELS: dict[str, str] = {
    "trainer_construction": "Trainer construction (make_trainer)",
    "fit_setup": "fit setup (fit start -> first step)",
    "between_steps": "between steps (batch fetch + loop glue)",
    "fit_teardown": "fit teardown (last step -> exchange)",
    "client_state_swap": "client state swap + rest of client_step",
    "exchange": "exchange (feature embedding)",
    "aggregation": "aggregation (FedAvg)",
    "checkpoint": "checkpoint",
    "other_loop": "other loop work (metrics, route, log)",
    "outside_rounds": "outside rounds (last checkpoint, encoder.pt)",
}
TRAINER_PARTS = ("trainer_construction", "fit_setup", "between_steps", "fit_teardown", "client_state_swap")


# ------------------------------------------------------------------------------------- timing
class Clock:
    """``perf_counter`` that first waits for the GPU when there is one to wait for, so a timer
    reads the work done, not the work queued."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class Meter:
    """Accumulated seconds by name, plus step / slice counts and every step's duration."""

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

    def step(self, dt: float, slices: int) -> None:
        """One training step of ``dt`` seconds over ``slices`` slices (the bare loop's count)."""
        self.add("steps", dt)
        self.step_times.append(dt)
        self.steps += 1
        self.slices += slices


class StepTimer(pl.Callback):
    """Times every training step of every client Trainer and the Lightning time around them.

    Together with the shims from :func:`instrument` it splits a client's ``fit`` into: fit setup
    (Trainer built, or a reused Trainer's ``setup`` hook -> first ``on_train_batch_start``), steps (``on_train_batch_start`` -> end of the
    module's ``on_train_batch_end``, :meth:`step_finished`), between steps, and fit teardown (last
    step -> ``export_features``).
    """

    def __init__(self, meter: Meter, clock: Clock) -> None:
        self.meter, self.clock = meter, clock
        self.trainer_built: float | None = None  # set by the make_trainer shim
        self.step_start: float | None = None
        self.step_end: float | None = None  # end of the previous step of this fit (None: none yet)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A fit starts: on a reused client Trainer (``federation.reuse_trainers``), fit setup
        counts from here (on a new one, from its construction)."""
        if stage == "fit":
            if self.trainer_built is None:
                self.trainer_built = self.clock()
            self.step_start = self.step_end = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        t = self.clock()
        if self.step_end is None:
            if self.trainer_built is not None:
                self.meter.add("fit_setup", t - self.trainer_built)
                self.trainer_built = None
        else:
            self.meter.add("between_steps", t - self.step_end)
        self.step_start = t
        self.meter.slices += int(batch["image"].shape[0])

    def step_finished(self) -> None:
        """Called after the module's ``on_train_batch_end`` (the momentum update)."""
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
    """Instance-level timing shims (on these objects only; no project code changes): Trainer
    construction, end of each step (after the momentum update), feature export, and the
    :class:`StepTimer` callback in the loop's Trainer template."""
    timer = StepTimer(meter, clock)
    loop.trainer_kwargs["callbacks"] = [timer]
    make_trainer = loop.make_trainer

    def timed_make_trainer() -> pl.Trainer:
        t0 = clock()
        trainer = make_trainer()
        t1 = clock()
        meter.add("make_trainer", t1 - t0)
        timer.trainer_built, timer.step_start, timer.step_end = t1, None, None
        return trainer

    loop.make_trainer = timed_make_trainer  # run() builds its ClientRuntime from this attribute
    on_batch_end = module.on_train_batch_end

    def timed_on_train_batch_end(outputs: Any, batch: Any, batch_idx: int) -> None:
        on_batch_end(outputs, batch, batch_idx)
        timer.step_finished()

    module.on_train_batch_end = timed_on_train_batch_end
    export = module.export_features

    def timed_export(*args: Any, **kwargs: Any) -> BankEntries:
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
    p: dict[str, Any],
    clients: int,
    img_size: int,
    cache_dir: str | None,
    augment_on: str = "off",
    volumes_on: str = "cpu",
) -> FederatedDataModule:
    """The phantom split by site over ``clients`` (``patients_per_client`` each), no validation
    patients, set up; ``augment_on``: ``off``, ``loader`` or ``device``; ``volumes_on``: the
    datamodule's (``device``: the project's loop moves the volumes to the training device)."""
    source = PhantomSource(
        num_subjects=p["patients_per_client"] * clients, num_sites=clients, seed=SEED, **p.get("phantom", {})
    )
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
        volumes_on=volumes_on,
        seed=SEED,
    )
    dm.setup("fit")
    return dm


def objective(p: dict[str, Any]) -> FCLObjective:
    """The FCL objective at profile ``p`` (both paths build their own copy)."""
    return FCLObjective(temperature=0.1, num_negatives=p["num_negatives"])


def build_module(p: dict[str, Any]) -> ContrastivePretrainModule:
    """The project's module at profile ``p``, seeded: every run starts from a copy of it."""
    torch.manual_seed(SEED)
    return ContrastivePretrainModule(
        features=list(p["features"]),
        proj_hidden=p["proj_hidden"],
        proj_dim=p["proj_dim"],
        objective=objective(p),
        momentum=MOMENTUM,
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
    federation: dict[str, Any] | None = None,
    precision: str = "32-true",
) -> dict[str, Any]:
    """``rounds`` rounds of the project's :class:`FederatedLoop`, instrumented; the counts, timers,
    the loop's per-round times and round losses. ``federation``: more ``Federation`` settings
    (``checkpoint_async``, ``reuse_trainers``); ``precision``: the Trainers' ``precision``."""
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
            **(federation or {}),
        ),
        module=module,
        datamodule=dm,
        trainer_kwargs={"accelerator": device.type, "devices": 1, "precision": precision},
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
        objective=objective(p),
    ).to(device)
    return model, torch.optim.Adam([w for n, w in model.named_parameters() if not n.startswith("momentum_")])


Batch = dict[str, torch.Tensor]


def prebuild_batches(
    dm: FederatedDataModule, rounds: int, local_steps: int | None = None
) -> list[list[list[list[Batch]]]]:
    """batches[r][c]: the epochs (lists of batches) the project's client c Trainer iterates in round
    r, as Lightning's loop does with the client's loader: one epoch, or (``local_steps``) epoch after
    epoch of the same loader until that many steps, the last epoch cut short."""

    def client_round(c: int, r: int) -> list[list[Batch]]:
        loader = dm.pretrain_loader(c, client_seed(SEED, r, c))
        if local_steps is None:
            return [list(loader)]
        epochs: list[list[Batch]] = []
        while (done := sum(map(len, epochs))) < local_steps:
            epoch = list(itertools.islice(loader, local_steps - done))
            if not epoch:
                break
            epochs.append(epoch)
        return epochs

    return [[client_round(c, r) for c in range(dm.num_clients)] for r in range(rounds)]


def run_bare(
    init_global: dict[str, torch.Tensor],
    p: dict[str, Any],
    dm: FederatedDataModule,
    batches: list[list[list[list[Batch]]]],
    rounds: int,
    device: torch.device,
    exchange_source: str = "embed",
    precision: str = "32-true",
) -> dict[str, Any]:
    """The same federated pre-training as :func:`run_project` in plain PyTorch, from the global
    weights ``init_global``, replaying ``batches``; counts, timers and round losses.
    ``precision``: ``32-true`` or ``bf16-mixed`` (``torch.autocast``, as Lightning's plug-in)."""
    if precision not in ("32-true", "bf16-mixed"):
        raise ValueError(f"the bare loop does precision 32-true or bf16-mixed, not {precision!r}")
    bf16 = precision == "bf16-mixed"
    clock, meter = Clock(device), Meter()
    C, dim = dm.num_clients, p["proj_dim"]
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
            for e, epoch in enumerate(batches[r][c]):
                if e:  # each later epoch's DataLoader iterator draws from the RNG too
                    torch.empty((), dtype=torch.int64).random_()
                for batch in epoch:
                    t0 = clock()
                    b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    if augment is not None and "aug_seed" in b:  # data.augment_on: device, as the project does it
                        b["image"], _ = augment(b["image"], b.pop("aug_seed"))
                        if "aug_seed_k" in b:
                            b["image_k"], _ = augment(b["image_k"], b.pop("aug_seed_k"))
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        out = model.step(b)
                    opt.zero_grad(set_to_none=True)
                    out["loss"].backward()
                    opt.step()
                    model.after_step(MOMENTUM)
                    client_losses.append(out["loss"].detach())
                    meter.step(clock() - t0, int(b["image"].shape[0]))
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


# ------------------------------------------------------------------------------------ figures
def overhead_parts(proj: dict[str, Any]) -> dict[str, float]:
    """The project run's time outside training steps, split into :data:`PART_LABELS` (seconds);
    the parts add up to ``wall_s`` minus the step time. ``outside_rounds`` is what lies outside
    the rounds (the wait for the last background checkpoint write, ``encoder.pt``, summary.json)."""
    rt, pm = proj["rounds_time"], proj["meter"]
    parts = {"trainer_construction": pm.get("make_trainer", 0.0)}
    parts.update({k: pm.get(k, 0.0) for k in ("fit_setup", "between_steps", "fit_teardown", "exchange")})
    parts["client_state_swap"] = rt["train"] - pm.get("steps", 0.0) - sum(parts.values())
    parts["aggregation"] = rt["aggregate"]
    parts["checkpoint"] = rt["checkpoint"]
    parts["other_loop"] = rt["total"] - rt["train"] - rt["aggregate"] - rt["checkpoint"]
    parts["outside_rounds"] = proj["wall_s"] - rt["total"]
    return parts


def disturbed(proj: dict[str, Any], bare: dict[str, Any]) -> list[str]:
    """The paths whose step times look disturbed by a busy machine: a step over 3x the median, or
    (if none) a project/bare median ratio outside 0.5-2 (the same step cannot differ this much)."""
    noisy = [
        name
        for name, r in (("project", proj), ("bare", bare))
        if r["step_times"] and max(r["step_times"]) > 3 * statistics.median(r["step_times"])
    ]
    if proj["step_times"] and bare["step_times"] and not noisy:
        q = statistics.median(proj["step_times"]) / statistics.median(bare["step_times"])
        if not 1 / 2 < q < 2:
            noisy = ["project" if q > 1 else "bare"]
    return noisy


def paired_ratios(proj_runs: list[dict[str, Any]], bare_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeat i's bare wall / project wall (the two runs side by side in time), and their median."""
    pairs = [b["wall_s"] / p["wall_s"] for p, b in zip(proj_runs, bare_runs)]
    return {"pairs": pairs, "median": statistics.median(pairs) if pairs else float("nan")}


def mean_ms(xs: list[float]) -> float:
    return 1000 * sum(xs) / max(1, len(xs))


def median_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs) if xs else float("nan")


def pct(x: float, total: float) -> str:
    """``x`` as a percentage of ``total``, right-aligned in 6 characters."""
    return f"{100 * x / total:5.1f}%" if total > 0 else "  n/a"


def figures(proj: dict[str, Any], bare: dict[str, Any]) -> dict[str, Any]:
    """The report's figures from a :func:`run_project` and a :func:`run_bare` result. The
    project's run time is the whole ``run()`` call: the rounds, plus what lies outside them,
    counted as overhead too; "overhead the bare loop does not have" leaves out exchange and FedAvg."""
    sps_p, sps_b = proj["slices"] / proj["wall_s"], bare["slices"] / bare["wall_s"]
    total, step_s = proj["wall_s"], proj["meter"].get("steps", 0.0)
    parts = overhead_parts(proj)
    overhead_s = total - step_s
    ratio, overhead = sps_p / sps_b, overhead_s / total
    return {
        "slices_per_s": {"project": sps_p, "bare": sps_b},
        "ratio": ratio,
        "overhead": overhead,
        "overhead_s": overhead_s,
        "overhead_breakdown_s": parts,
        "trainer_setup_teardown_s": sum(parts[k] for k in TRAINER_PARTS),
        "overhead_not_in_bare_s": overhead_s - parts["exchange"] - parts["aggregation"],
        "round_total_s": total,
        "step_s": step_s,
        "bare_non_step_s": bare["wall_s"] - bare["meter"].get("steps", 0.0),
        "loss_max_abs_diff": max((abs(a - b) for a, b in zip(proj["losses"], bare["losses"])), default=float("nan")),
        "pass": {"ratio": ratio >= TARGET_RATIO, "overhead": overhead <= TARGET_OVERHEAD},
        "disturbed": disturbed(proj, bare),
    }
