"""The in-process federated loop: clients one after another, each with its own quiet Trainer;
the server merges updates with the aggregator plug-in and routes exchanged features."""

from __future__ import annotations

import json
import logging
import time
from itertools import zip_longest
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fcl_lightning.console import log_console, output_console
from fcl_lightning.errors import ConfigError
from fcl_lightning.fcl.aggregate import state_nbytes
from fcl_lightning.fcl.exchange import payload_nbytes, route
from fcl_lightning.federation.checkpoint import (
    FORMAT,
    BackgroundWriter,
    CheckpointError,
    bank_from_dict,
    bank_to_dict,
    load_checkpoint,
    resolve_ckpt_path,
    rng_state,
    set_rng_state,
    snapshot,
    to_cpu,
    update_summary,
)
from fcl_lightning.federation.client import ClientResult, ClientRuntime, client_step
from fcl_lightning.federation.config import Federation
from fcl_lightning.io import atomic_link, atomic_save, atomic_write_text, check_writable, remove_interrupted_writes
from fcl_lightning.lit.base import FederatedModule
from fcl_lightning.tracking import (
    continue_csv_logs,
    csv_version,
    finish,
    log_config,
    log_dice_table,
    log_images,
    log_summary,
    per_client_dice_rows,
    wandb_run_id,
)

log = logging.getLogger(__name__)


class Clients:
    """Runs the client steps of one round for the loop. Subclasses: :class:`InProcessClients`
    (default) and the Flower grid in ``fcl_lightning.flower.server``."""

    num_clients: int
    #: client -> why it was left out of the last round
    failures: dict[int, str]

    def train_round(
        self, round_idx: int, starts: dict[int, dict[str, torch.Tensor]], inbox: dict[int, Any], progress: Any
    ) -> dict[int, ClientResult]:
        """Train every client in ``starts`` from its start weights and remote features; return the
        results of the clients that succeeded."""
        raise NotImplementedError

    def states(self) -> dict[int, Any]:
        """Per-client state the server's checkpoint holds (none when clients keep their own)."""
        return {}

    def load_states(self, states: dict[int, Any]) -> None:
        """Restore what :meth:`states` returned, when resuming."""


class InProcessClients(Clients):
    """Every client in this process, one after another, sharing one module instance (its state
    is swapped in and out by :func:`client_step`)."""

    def __init__(self, runtime: ClientRuntime, num_clients: int) -> None:
        self.runtime, self.num_clients = runtime, num_clients
        self._states: dict[int, Any] = {}
        self.failures = {}

    def train_round(self, round_idx, starts, inbox, progress) -> dict[int, ClientResult]:
        results: dict[int, ClientResult] = {}
        for i, (c, start) in enumerate(sorted(starts.items())):
            progress(i, c)
            results[c] = client_step(
                start, self._states.get(c), inbox.get(c), client=c, round_idx=round_idx, runtime=self.runtime
            )
            self._states[c] = to_cpu(results[c].state)
        return results

    def states(self) -> dict[int, Any]:
        return dict(self._states)

    def load_states(self, states: dict[int, Any]) -> None:
        self._states = dict(states)


class FederatedLoop:
    """Runs ``federation.rounds`` rounds of ``client_step`` over the datamodule's clients.

    Args:
        federation: the ``federation`` config section.
        module: the LightningModule instance (reused for every client: state is swapped in and out).
        datamodule: a :class:`~fcl_lightning.data.datamodule.FederatedDataModule`.
        trainer_kwargs: the ``trainer`` section, the template of every client's Trainer.
        root_dir: where checkpoints, ``encoder.pt`` and ``summary.json`` go.
        loggers: Lightning loggers that receive round-level and per-client metrics.
        seed: the run's seed (client rounds are seeded from it).
        config_text: the resolved config, stored in checkpoints.
    """

    def __init__(
        self,
        federation: Federation,
        module: FederatedModule,
        datamodule: Any,
        trainer_kwargs: dict[str, Any] | None = None,
        root_dir: str | Path = ".",
        loggers: list[Logger] | None = None,
        seed: int = 0,
        config_text: str = "",
        console: Console | None = None,
    ) -> None:
        self.fed, self.module, self.dm = federation, module, datamodule
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.root = Path(root_dir)
        self.loggers = list(loggers or [])
        self.seed, self.config_text = int(seed), config_text
        self.console = console or output_console()  # round lines, tables: results
        self.log_console = log_console()  # the progress bar, notices
        self._probe: tuple[list, bool] | None = None
        self._probe_chosen = False  # the monitor's probe set is chosen once, at its first use

    # -------------------------------------------------------------- helpers
    def make_trainer(self) -> pl.Trainer:
        """A quiet per-client Trainer from the ``trainer`` template (the federation owns logging,
        progress and checkpoints, and sets the epoch count)."""
        kw = dict(self.trainer_kwargs)
        for k in (
            "logger",
            "enable_checkpointing",
            "enable_progress_bar",
            "enable_model_summary",
            "max_epochs",
            "min_epochs",
            "max_steps",
            "default_root_dir",
            "callbacks",
        ):
            kw.pop(k, None)
        callbacks = [
            cb
            for cb in (self.trainer_kwargs.get("callbacks") or [])
            if not isinstance(cb, (pl.callbacks.ModelCheckpoint, pl.callbacks.ProgressBar, pl.callbacks.ModelSummary))
        ]
        if self.fed.local_steps is not None:
            kw.update(max_epochs=-1, max_steps=self.fed.local_steps)
        else:
            kw.update(max_epochs=self.fed.local_epochs)
        return pl.Trainer(
            **kw,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
            default_root_dir=str(self.root / "clients"),
        )

    def select_clients(self, round_idx: int, num_clients: int) -> list[int]:
        k = self.fed.clients_per_round
        if k is None or k >= num_clients:
            return list(range(num_clients))
        g = torch.Generator().manual_seed(self.seed * 7919 + round_idx)
        return sorted(torch.randperm(num_clients, generator=g)[:k].tolist())

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ run
    def client_runtime(self) -> ClientRuntime:
        """What every client step runs with (the in-process clients and the Flower ClientApp)."""
        return ClientRuntime(
            self.module,
            self.dm,
            self.make_trainer,
            self.seed,
            self.fed.rounds,
            exchange=self.fed.exchange and self.fed.mode == "federated" and self.module.shares_features,
            exchange_per_partition=self.fed.exchange_per_partition,
            exchange_source=self.fed.exchange_source,
            keep_optimizer_state=self.fed.keep_optimizer_state,
        )

    def run(self, ckpt_path: str | None = None, clients: Clients | None = None) -> dict[str, Any]:
        """Train all rounds (resuming from ``ckpt_path`` if given) and return the summary.

        ``clients`` runs the client steps of a round: in this process by default
        (:class:`InProcessClients`), or on Flower nodes (``fcl_lightning.flower``).
        """
        # everything that needs no data is checked before any is loaded, and nothing is written
        # for a run that fails its checks
        path = resolve_ckpt_path(ckpt_path, self.root)
        ckpt = load_checkpoint(path) if path is not None else None
        C = clients.num_clients if clients is not None else self.dm.num_clients
        self.validate(ckpt, path, C)
        remove_interrupted_writes(self.root, self.root / "checkpoints")
        if clients is None:
            self.dm.setup("fit")
            clients = InProcessClients(self.client_runtime(), self.dm.num_clients)
        if self.fed.select_best and not any(getattr(self.dm, "val", None) or []):
            raise ConfigError(
                "federation.select_best needs validation patients (data.val_fraction > 0 or data.cv_folds)"
            )
        if self.config_text:
            atomic_write_text(self.config_text, self.root / "config.yaml")
        global_w = {k: v.cpu() for k, v in self.module.global_state().items()}
        client_w: dict[int, dict[str, torch.Tensor]] = {}
        best: dict[int, tuple[float, dict[str, torch.Tensor]]] = {}  # select_best: client -> (val Dice, weights)
        inbox: dict[int, Any] = {c: None for c in range(C)}
        history: list[dict[str, float]] = []
        dice_rows: list[list[Any]] = []  # per-round, per-client Dice (a wandb table when wandb is on)
        comm = {"weights_down": 0, "weights_up": 0, "features_up": 0, "features_down": 0}
        start, elapsed = 0, 0.0

        if ckpt is not None:
            self.module.load_global_state(ckpt["global"])
            global_w = ckpt["global"]
            client_w = {int(c): w for c, w in ckpt["client_weights"].items()}
            best = {
                int(c): (float(ckpt["best_val_dice"][c]), w) for c, w in ckpt.get("best_client_weights", {}).items()
            }
            clients.load_states({int(c): s for c, s in ckpt["clients"].items()})
            inbox = {c: bank_from_dict(ckpt["inbox"].get(str(c))) for c in range(C)}
            history, comm, start, elapsed = ckpt["history"], ckpt["comm"], ckpt["round"], ckpt["elapsed_s"]
            dice_rows = [list(r) for r in ckpt.get("dice_rows", [])]
            set_rng_state(ckpt["rng"])
            self.log_console.print(f"[bold]resuming[/] from {path} after round {start}/{self.fed.rounds}")
            continue_csv_logs(self.loggers, start)

        log_config(self.loggers, self.config_text)
        self.wandb_id = wandb_run_id(self.loggers)  # stored in checkpoints: a resume continues this run
        t_run = time.perf_counter()
        self._writer = BackgroundWriter(self.fed.checkpoint_async)
        self._written = None  # the last checkpoint handed to the writer (its copies are reused)
        # the writer's exit: the last checkpoint is on disk (or its error raised) before going on
        with self._writer, self._progress() as progress:
            task = progress.add_task("rounds", total=self.fed.rounds, completed=start, info="")
            if start == 0:  # the monitors at initialisation: the baseline the rounds are read against
                init = self._monitor(0, global_w)
                if init:
                    self.log_metrics({**init, "round": 0}, step=0)
                    self.console.print(
                        f"round   0 | at initialisation | probe {init['round/monitor/probe_acc']:.2f} | "
                        f"spread {init['round/monitor/spread']:.2f}",
                        soft_wrap=True,
                    )
            for r in range(start, self.fed.rounds):
                self._writer.check()  # the previous round's checkpoint failed: stop before training on
                t0 = time.perf_counter()
                wanted = self.select_clients(r, C)
                starts = {}
                for c in wanted:
                    if self.fed.mode == "local":
                        starts[c] = client_w[c] if c in client_w else self.module.client_initial_weights(c, global_w)
                    else:
                        starts[c] = global_w

                def show(i: int, c: int, n: int = len(wanted), r: int = r) -> None:
                    progress.update(task, info=f"round {r + 1}/{self.fed.rounds} client {i + 1}/{n} (#{c})")

                results = clients.train_round(r, starts, {c: inbox[c] for c in wanted}, show)
                selected = sorted(results)
                if len(selected) < self.fed.min_clients:
                    raise RuntimeError(
                        f"round {r + 1}: only {len(selected)} of {len(wanted)} clients replied "
                        f"(federation.min_clients is {self.fed.min_clients})"
                    )
                for c in sorted(set(wanted) - set(selected)):
                    self.console.print(
                        f"[yellow]round {r + 1}: client {c} left out of this round "
                        f"({clients.failures.get(c, 'no reply')})[/]"
                    )
                t_train = time.perf_counter() - t0

                t1 = time.perf_counter()
                if self.fed.mode == "federated":
                    global_w = self.fed.aggregator(
                        [results[c].update for c in selected], [results[c].num_samples for c in selected]
                    )
                else:
                    client_w.update({c: results[c].update for c in selected})
                    if self.fed.select_best:
                        for c in selected:
                            d = results[c].metrics.get("val/dice_mean")
                            if d is not None and (c not in best or d > best[c][0]):
                                best[c] = (float(d), results[c].update)
                t_agg = time.perf_counter() - t1

                metrics = self._round_metrics(r, selected, results, global_w, inbox, comm)
                metrics.update(self._monitor(r + 1, global_w))
                if any(res.features is not None for res in results.values()):
                    dim = next(int(res.features.vectors.shape[1]) for res in results.values())
                    inbox = route({c: results[c].features for c in selected}, dim, recipients=range(C))
                    for c in range(C):
                        nb = payload_nbytes(inbox[c]) if inbox[c] is not None else 0
                        metrics[f"client{c}/comm/features_down_bytes"] = nb
                        comm["features_down"] += nb
                    metrics["round/comm/features_down_bytes"] = sum(
                        metrics[f"client{c}/comm/features_down_bytes"] for c in range(C)
                    )
                elapsed += time.perf_counter() - t0
                metrics.update({"round/time/train_s": t_train, "round/time/aggregate_s": t_agg, "round": r + 1})
                history.append({k: float(v) for k, v in metrics.items() if k.startswith("round/")})
                ds = self.fed.downstream
                if (
                    ds is not None
                    and ds.every_n_rounds
                    and (r + 1) % ds.every_n_rounds == 0
                    and r + 1 < self.fed.rounds
                ):
                    self.module.load_global_state(global_w)
                    down = ds.run(
                        self.module,
                        self.dm,
                        self.root,
                        self.seed,
                        self.console,
                        final=False,
                        trainer_kwargs=self.trainer_kwargs,
                    )
                    metrics.update(down)
                    history[-1].update(down)
                new_rows = per_client_dice_rows(metrics, r + 1)
                dice_rows += new_rows
                t2 = time.perf_counter()
                periodic = (r + 1) % self.fed.checkpoint_every == 0 or r + 1 == self.fed.rounds
                self._checkpoint(
                    r + 1,
                    global_w,
                    client_w,
                    clients.states(),
                    inbox,
                    history,
                    comm,
                    elapsed,
                    C,
                    periodic,
                    dice_rows,
                    best,
                )
                metrics["round/time/checkpoint_s"] = time.perf_counter() - t2
                metrics["round/time/total_s"] = time.perf_counter() - t0
                history[-1].update({k: metrics[k] for k in ("round/time/checkpoint_s", "round/time/total_s")})
                self.log_metrics(metrics, step=r + 1)
                for lg in self.loggers:  # every round on disk: a killed run keeps its rows
                    lg.save()
                if new_rows:
                    log_dice_table(self.loggers, dice_rows, step=r + 1)
                progress.update(
                    task,
                    advance=1,
                    info=f"round {r + 1}/{self.fed.rounds} loss {metrics.get('round/train/loss', float('nan')):.4f}",
                )
                self.console.print(self._round_line(r, metrics), soft_wrap=True)
        if self.fed.mode == "federated":
            self.module.load_global_state(global_w)
        summary = self._finish(global_w, client_w, history, comm, elapsed, time.perf_counter() - t_run)
        if self.fed.downstream is not None and self.fed.mode == "federated" and hasattr(self.module, "encoder_state"):
            t0 = time.perf_counter()
            down = self.fed.downstream.run(
                self.module, self.dm, self.root, self.seed, self.console, trainer_kwargs=self.trainer_kwargs
            )
            down["downstream/time_s"] = time.perf_counter() - t0
            self.log_metrics(down, step=self.fed.rounds)
            update_summary(self.root, down)
            summary.update(down)
            dice_rows += per_client_dice_rows(down, self.fed.rounds)
            log_dice_table(self.loggers, dice_rows, step=self.fed.rounds)
            log_images(
                self.loggers,
                {
                    "downstream/examples": self.root / "downstream.png",
                    "downstream/embedding": self.root / "embedding.png",
                },
                step=self.fed.rounds,
            )
        log_summary(self.loggers, json.loads((self.root / "summary.json").read_text()))
        self.console.print(
            f"outputs in {self.root}: "
            + ", ".join(
                n
                for n in ("encoder.pt", "encoders/", "summary.json", "checkpoints/", "logs/", "downstream.png")
                if (self.root / n).exists()
            ),
            soft_wrap=True,
        )
        for lg in self.loggers:
            lg.save()
        finish(self.loggers)
        return summary

    def validate(self, ckpt: dict[str, Any] | None, path: Path | None, num_clients: int) -> None:
        """The checks that need no data: image size against the encoder's depth, the output
        folder, and a checkpoint to resume from against the config (clients, rounds, shapes)."""
        size, multiple = getattr(self.dm, "img_size", None), self.module.input_multiple
        if size is not None and size % multiple:
            raise ConfigError(
                f"data.img_size={size} must be a multiple of {multiple}: the encoder halves the image "
                f"{multiple.bit_length() - 1} times (model features); try {max(multiple, round(size / multiple) * multiple)}"
            )
        if self.fed.select_best and self.fed.mode != "local":
            raise ConfigError("federation.select_best needs federation.mode local")
        if self.fed.mode == "federated" and self.module.per_client_init:
            raise ConfigError(
                "a per-client pretrained path ('{client}' in model.pretrained) needs "
                "federation.mode local; federated fine-tuning starts every client from one model"
            )
        check_writable(self.root)
        if ckpt is None:
            return
        if ckpt["num_clients"] != num_clients:
            raise CheckpointError(
                f"{path} was written with {ckpt['num_clients']} clients, the config has {num_clients} "
                "(data.num_clients)"
            )
        if ckpt["round"] > self.fed.rounds:
            raise CheckpointError(
                f"{path} is from round {ckpt['round']}, after the configured "
                f"federation.rounds={self.fed.rounds}: set federation.rounds >= {ckpt['round']} to go on"
            )
        problem = self.module.global_state_mismatch(ckpt["global"])
        if problem:
            raise CheckpointError(
                f"{path} does not fit the configured model ({type(self.module).__name__}): {problem}; "
                "resume with the config the run was started with"
            )

    # ------------------------------------------------------------- pieces
    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]FCL[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.log_console,
            transient=True,
            disable=not self.log_console.is_terminal,
        )

    def _round_metrics(self, r, selected, results, global_w, inbox, comm) -> dict[str, float]:
        m: dict[str, float] = {}
        n_total = sum(results[c].num_samples for c in selected)
        keys = sorted({k for c in selected for k in results[c].metrics})
        for k in keys:
            vals = [(results[c].metrics[k], results[c].num_samples) for c in selected if k in results[c].metrics]
            m[f"round/{k}"] = sum(v * n for v, n in vals) / max(1, sum(n for _, n in vals))
            for c in selected:
                if k in results[c].metrics:
                    m[f"client{c}/{k}"] = results[c].metrics[k]
        up = down = feat_up = 0
        for c in selected:
            w_down = state_nbytes(global_w) if self.fed.mode == "federated" else 0
            w_up = state_nbytes(results[c].update) if self.fed.mode == "federated" else 0
            f_up = payload_nbytes(results[c].features) if results[c].features is not None else 0
            m[f"client{c}/comm/weights_down_bytes"] = w_down
            m[f"client{c}/comm/weights_up_bytes"] = w_up
            m[f"client{c}/comm/features_up_bytes"] = f_up
            up, down, feat_up = up + w_up, down + w_down, feat_up + f_up
        comm["weights_up"] += up
        comm["weights_down"] += down
        comm["features_up"] += feat_up
        m.update(
            {
                "round/comm/weights_up_bytes": up,
                "round/comm/weights_down_bytes": down,
                "round/comm/features_up_bytes": feat_up,
                "round/clients": len(selected),
                "round/train_volumes": n_total,
            }
        )
        return m

    def _probe_set(self, max_volumes: int) -> tuple[list, bool] | None:
        """The monitor's fixed probe set, chosen once: the first ``max_volumes`` held-out volumes
        (validation patients of every client, interleaved, then the test set), else training
        volumes (with a warning); and whether they are held out. ``None``: no data here (a Flower
        server) or fewer than two patients (no leave-one-patient-out probe)."""
        if not self._probe_chosen:
            self._probe_chosen = True
            if getattr(self.dm, "_ready", False):

                def interleaved(groups: list) -> list:
                    return [v for vs in zip_longest(*groups) for v in vs if v is not None]

                held = (interleaved(self.dm.val) + list(self.dm.test))[:max_volumes]
                for vols, held_out in ((held, True), (interleaved(self.dm.train)[:max_volumes], False)):
                    if len({v.record.patient for v in vols}) >= 2:
                        self._probe = (vols, held_out)
                        break
                if self._probe is not None and not self._probe[1]:
                    log.warning(
                        "monitor: no held-out patients (data.val_fraction is 0 and no test_source); the "
                        "partition probe scores training patients (leave-one-patient-out)"
                    )
        return self._probe

    def _monitor(self, done: int, global_w: dict[str, torch.Tensor]) -> dict[str, float]:
        """``round/monitor/*``: the collapse and learning monitors of the global encoder."""
        mon = self.fed.monitor
        features = getattr(self.module, "probe_features", None)
        if mon is None or features is None or self.fed.mode != "federated" or not mon.due(done, self.fed.rounds):
            return {}
        probe = self._probe_set(mon.max_volumes)
        if probe is None:
            return {}
        vols, held_out = probe
        self.module.load_global_state(global_w)
        was_training = self.module.training
        self.module.eval()
        figures = mon.measure(
            features,
            [v.image for v in vols],
            [v.record.patient for v in vols],
            self.dm.num_partitions,
            device=next(self.module.parameters()).device,
        )
        self.module.train(was_training)
        out = {f"round/monitor/{k}": v for k, v in figures.items()}
        out["round/monitor/probe_held_out"] = float(held_out)
        out["round/monitor/collapsed"] = float(figures["spread"] < mon.collapse_spread)
        return out

    @staticmethod
    def _round_line(r: int, m: dict[str, float]) -> str:
        parts = [f"round {r + 1:>3}"]
        for key, label, digits in (
            ("round/train/loss", "loss", 4),
            ("round/train/loss_local", "local", 4),
            ("round/train/loss_remote", "remote", 4),
            ("round/monitor/probe_acc", "probe", 2),
            ("round/monitor/spread", "spread", 2),
        ):
            if key in m:
                parts.append(f"{label} {m[key]:.{digits}f}")
        if m.get("round/monitor/collapsed"):
            parts.append("[bold red]COLLAPSED: every slice embeds to nearly the same vector[/]")
        up = m.get("round/comm/weights_up_bytes", 0) / 2**20
        down = m.get("round/comm/weights_down_bytes", 0) / 2**20
        feats = m.get("round/comm/features_up_bytes", 0) / 2**10
        parts.append(f"weights up {up:.1f} / down {down:.1f} MiB, features shared {feats:.0f} KiB")
        parts.append(f"{m['round/time/total_s']:.1f} s")
        return " | ".join(parts)

    def _checkpoint(
        self, done, global_w, client_w, states, inbox, history, comm, elapsed, C, periodic, dice_rows, best
    ) -> None:
        ckpt = {
            "format": FORMAT,
            "round": done,
            "rounds": self.fed.rounds,
            "num_clients": C,
            "module": type(self.module).__name__,
            "global": global_w,
            "client_weights": {str(c): w for c, w in client_w.items()},
            "clients": {str(c): s for c, s in states.items() if s is not None},
            "inbox": {str(c): bank_to_dict(b) for c, b in inbox.items() if b is not None},
            "rng": rng_state(),
            "history": history,
            "comm": comm,
            "elapsed_s": elapsed,
            "seed": self.seed,
            "config": self.config_text,
            "wandb_run_id": self.wandb_id,
            "csv_version": csv_version(self.loggers),
            "dice_rows": dice_rows,
            # select_best: each client's weights from its round with the best validation Dice (what `test` scores)
            "best_client_weights": {str(c): w for c, (_, w) in best.items()},
            "best_val_dice": {str(c): d for c, (d, _) in best.items()},
        }
        # both rebuild every dict and list (the loop appends to history later); in the background,
        # tensors are copied too, into the previous checkpoint's buffers once its write is done,
        # because the next round mutates some of them in place (Adam's moments)
        if self._writer.enabled:
            self._writer.wait()
            ckpt = snapshot(ckpt, into=self._written)
            self._written = ckpt
        else:
            ckpt = to_cpu(ckpt)
        ckdir = self.root / "checkpoints"

        def write() -> None:
            try:
                if periodic:  # serialise once; last.ckpt is a link to the round file
                    atomic_link(atomic_save(ckpt, ckdir / f"round-{done:03d}.ckpt"), ckdir / "last.ckpt")
                else:
                    atomic_save(ckpt, ckdir / "last.ckpt")
            except CheckpointError as err:
                before = f"round {done - 1}'s (--ckpt_path last resumes there)" if done > 1 else "none"
                raise type(err)(f"round {done}'s checkpoint: {err}; the last whole checkpoint is {before}") from err

        self._writer.submit(write)

    def _finish(self, global_w, client_w, history, comm, elapsed, wall) -> dict[str, Any]:
        if self.fed.mode == "federated" and hasattr(self.module, "encoder_state"):
            atomic_save(self.module.encoder_state(), self.root / "encoder.pt")
        elif hasattr(self.module, "encoder_state") and client_w:
            # local pre-training (e.g. Local CL): one encoder per client, and their FedAvg as
            # encoder.pt, the common start of federated fine-tuning
            clients = sorted(client_w)
            for c in clients:
                self.module.load_global_state(client_w[c])
                atomic_save(self.module.encoder_state(), self.root / "encoders" / f"client{c}.pt")
            merged = self.fed.aggregator(
                [client_w[c] for c in clients], [self.module.num_samples(self.dm, c) for c in clients]
            )
            self.module.load_global_state(merged)
            atomic_save(self.module.encoder_state(), self.root / "encoder.pt")
        last = history[-1] if history else {}
        summary = {
            "stage": type(self.module).__name__,
            "rounds_completed": len(history),
            "final": {
                k[len("round/") :]: v
                for k, v in last.items()
                if k.startswith(("round/train/", "round/val/", "round/monitor/"))
            },
            "bytes": dict(comm),
            "wall_time_s": elapsed,
        }
        update_summary(self.root, {"pretrain" if hasattr(self.module, "encoder_state") else "finetune": summary})
        return summary
