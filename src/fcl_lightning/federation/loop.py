"""The round engine: each round selects clients, trains them (in this process, one after another
with a quiet Trainer each, or on Flower nodes), merges their updates with the aggregator plug-in
and routes the exchanged features. Everything else a run does is a round hook (``hooks.py``)."""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from rich.console import Console

from fcl_lightning import layout
from fcl_lightning.console import log_console, output_console
from fcl_lightning.errors import ConfigError
from fcl_lightning.fcl.exchange import route
from fcl_lightning.federation.checkpoint import (
    ResumePoint,
    check_checkpoint,
    client_states_of,
    find_resume,
    set_rng_state,
)
from fcl_lightning.federation.client import ClientResult, ClientRuntime, ClientTrainers, client_step
from fcl_lightning.federation.config import Federation
from fcl_lightning.federation.hooks import (
    CheckpointHook,
    CommCounter,
    DownstreamHook,
    ExportHook,
    MonitorHook,
    ReportHook,
    RoundHook,
)
from fcl_lightning.federation.lock import RunLock
from fcl_lightning.federation.state import FederatedData, RunContext, RunState
from fcl_lightning.interrupt import RunInterrupted
from fcl_lightning.io import atomic_write_text, check_writable, remove_interrupted_writes
from fcl_lightning.lit.base import FederatedModule
from fcl_lightning.privacy.accountant import spent_epsilon
from fcl_lightning.runtime import CALLER_OWNS, quiet_trainer, resident_device
from fcl_lightning.tracking import continue_csv_logs

log = logging.getLogger(__name__)

#: Lightning callbacks the federation replaces (its own checkpoints, progress bar and round lines)
REPLACED_CALLBACKS = (pl.callbacks.ModelCheckpoint, pl.callbacks.ProgressBar, pl.callbacks.ModelSummary)


class Clients:
    """Runs the client steps of one round for the loop. Subclasses: :class:`InProcessClients`
    (default) and the Flower grid in ``fcl_lightning.flower.server``."""

    num_clients: int
    #: client -> why it was left out of the last round
    failures: dict[int, str]
    #: whether the clients' states come back to this process (which then saves them in
    #: ``<root>/clients/``); ``False``: each client saves its own where it trains
    states_come_back: bool = False
    #: the run's state, for what a round's messages carry (which saved state a client resumes from)
    run_state: RunState | None = None
    #: federation.privacy's noise multiplier as the run fixed it (a resume may recalibrate it):
    #: what Flower nodes are told to noise with
    noise_multiplier: float | None = None

    def train_round(
        self, round_idx: int, starts: dict[int, dict[str, torch.Tensor]], inbox: dict[int, Any], progress: Any
    ) -> dict[int, ClientResult]:
        """Train every client in ``starts`` from its start weights and remote features; return the
        results of the clients that succeeded."""
        raise NotImplementedError

    def load_states(self, states: dict[int, Any]) -> None:
        """The clients' states a resumed run starts from (when they come back to this process)."""


class InProcessClients(Clients):
    """Every client in this process, one after another, sharing one module instance (its state
    is swapped in and out by :func:`client_step`). Client states stay where they were trained
    (on the training device); the checkpoint copies them to the CPU."""

    states_come_back = True

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
            self._states[c] = results[c].state
        return results

    def load_states(self, states: dict[int, Any]) -> None:
        self._states = dict(states)


class FederatedLoop:
    """Runs ``federation.rounds`` rounds of ``client_step`` over the datamodule's clients.

    Args:
        federation: the ``federation`` config section.
        module: the LightningModule instance (reused for every client: state is swapped in and out).
        datamodule: what the loop needs of the data (:class:`~fcl_lightning.federation.state.FederatedData`;
            :class:`~fcl_lightning.data.datamodule.FederatedDataModule` has it).
        trainer_kwargs: the ``trainer`` section, the template of every client's Trainer.
        root_dir: where checkpoints, ``encoder.pt`` and ``summary.json`` go.
        loggers: Lightning loggers that receive round-level and per-client metrics.
        seed: the run's seed (client rounds are seeded from it).
        config_text: the resolved config, stored in checkpoints.
        hooks: the round hooks (``None``: :meth:`default_hooks`, with ``federation.hooks`` added).
    """

    def __init__(
        self,
        federation: Federation,
        module: FederatedModule,
        datamodule: FederatedData,
        trainer_kwargs: dict[str, Any] | None = None,
        root_dir: str | Path = ".",
        loggers: list[Logger] | None = None,
        seed: int = 0,
        config_text: str = "",
        console: Console | None = None,
        hooks: list[RoundHook] | None = None,
    ) -> None:
        self.fed, self.module, self.dm = federation, module, datamodule
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.root = Path(root_dir)
        self.loggers = list(loggers or [])
        self.seed, self.config_text = int(seed), config_text
        self.console = console or output_console()  # round lines, tables: results
        self.log_console = log_console()  # the progress bar, notices
        self.hooks = hooks if hooks is not None else self.default_hooks()
        self.clients: Clients | None = None  # who trains the rounds, set by run()
        self.state: RunState | None = None  # the run's state, once run() has built or resumed it
        self.context: RunContext | None = None  # what the hooks see of the run, set with the state

    def default_hooks(self) -> list[RoundHook]:
        """Byte counts, monitors, the exported encoder and summary, the downstream evaluation,
        ``federation.hooks``, checkpoints, then the report (loggers, progress, round lines)."""
        ds = [DownstreamHook(self.fed.downstream)] if self.fed.downstream is not None else []
        return [CommCounter(), MonitorHook(), ExportHook(), *ds, *self.fed.hooks, CheckpointHook(), ReportHook()]

    # -------------------------------------------------------------- helpers
    def make_trainer(self) -> pl.Trainer:
        """A quiet per-client Trainer from the ``trainer`` template (the federation owns logging,
        progress and checkpoints, and sets the epoch count); the template's callbacks come along,
        except the ones the federation replaces (checkpoints, progress bars, model summaries)."""
        callbacks = [
            cb for cb in (self.trainer_kwargs.get("callbacks") or []) if not isinstance(cb, REPLACED_CALLBACKS)
        ]
        if self.fed.local_steps is not None:
            budget = {"max_epochs": -1, "max_steps": self.fed.local_steps}
        else:
            budget = {"max_epochs": self.fed.local_epochs}
        return quiet_trainer(
            self.trainer_kwargs, **budget, callbacks=callbacks, default_root_dir=str(self.root / layout.CLIENTS)
        )

    def train_device(self) -> torch.device | None:
        """The one device the client Trainers train on (``None``: Lightning's strategy decides,
        e.g. several devices)."""
        return resident_device(self.trainer_kwargs)

    def ignored_trainer_settings(self) -> list[str]:
        """The ``trainer`` settings the client Trainers do not take (set away from Lightning's
        defaults): the budget, checkpointing, progress and summary are the federation's."""
        defaults = inspect.signature(pl.Trainer).parameters
        out = [
            f"trainer.{k}={v}"
            for k, v in self.trainer_kwargs.items()
            if k in CALLER_OWNS and v is not None and v != defaults[k].default
        ]
        out += [
            f"trainer.callbacks ({type(cb).__name__})"
            for cb in self.trainer_kwargs.get("callbacks") or []
            if isinstance(cb, REPLACED_CALLBACKS)
        ]
        return out

    def select_clients(self, round_idx: int, num_clients: int) -> list[int]:
        k = self.fed.clients_per_round
        if k is None or k >= num_clients:
            return list(range(num_clients))
        g = torch.Generator().manual_seed(self.seed * 7919 + round_idx)
        return sorted(torch.randperm(num_clients, generator=g)[:k].tolist())

    # ------------------------------------------------------------------ run
    def client_runtime(self) -> ClientRuntime:
        """What every client step runs with (the in-process clients and the Flower ClientApp);
        with ``data.volumes_on: device`` the volumes move to the training device here, once."""
        self.dm.place(self.train_device())
        return ClientRuntime(
            self.module,
            self.dm,
            ClientTrainers(self.make_trainer, self.fed.local_steps, self.fed.reuse_trainers),
            self.seed,
            self.fed.rounds,
            exchange=self.fed.exchange and self.fed.mode.global_model and self.module.shares_features,
            exchange_per_partition=self.fed.exchange_per_partition,
            exchange_source=self.fed.exchange_source,
            keep_optimizer_state=self.fed.keep_optimizer_state,
            privacy=self.fed.privacy,
        )

    def run(self, ckpt_path: str | ResumePoint | None = None, clients: Clients | None = None) -> dict[str, Any]:
        """Train all rounds (resuming from ``ckpt_path`` if given: ``last``, a path, or the
        :class:`ResumePoint` the CLI already read) and return the summary.

        ``clients`` runs the client steps of a round: in this process by default
        (:class:`InProcessClients`), or on Flower nodes (``fcl_lightning.flower``).
        """
        # everything that needs no data is checked before any is loaded, and nothing is written
        # for a run that fails its checks
        resume = ckpt_path if isinstance(ckpt_path, ResumePoint) else find_resume(ckpt_path, self.root)
        ckpt_path, path, ckpt = resume.requested, resume.path, resume.ckpt
        C = clients.num_clients if clients is not None else self.dm.num_clients
        self.validate(ckpt, path, C, states_here=clients is None or clients.states_come_back)
        with RunLock(self.root):  # one run per folder, from here to the end
            if ckpt is None:
                self.check_fresh_folder()
            if ckpt_path == "last" and path is None:
                self.log_console.print(f"nothing to resume in {self.root} (no checkpoints/last.ckpt): starting the run")
            return self._run(ckpt, path, C, clients)

    def interrupted_message(self, exc: RunInterrupted, ckpt: dict[str, Any] | None) -> str:
        """Where a stop signal left the run and how to go on (``ckpt``: what it was resuming from)."""
        state = self.state
        if state is None and ckpt is not None:
            return (
                f"interrupted by {exc.signame} before round {int(ckpt['round']) + 1} started: round "
                f"{int(ckpt['round'])}'s checkpoint is the last; resume with --ckpt_path last"
            )
        if state is None:
            return f"interrupted by {exc.signame} before round 1 started: nothing to resume; run the command again"
        at = (
            f"at round {state.round + 1} of {self.fed.rounds}"
            if state.round < self.fed.rounds
            else "after the last round"
        )
        if state.checkpointed is None:
            return (
                f"interrupted by {exc.signame} {at}, before any checkpoint: run the command again "
                "(with --ckpt_path last it starts when there is nothing to resume)"
            )
        return (
            f"interrupted by {exc.signame} {at}: round {state.checkpointed}'s checkpoint is the last; "
            "resume with --ckpt_path last"
        )

    def _run(self, ckpt: dict[str, Any] | None, path: Path | None, C: int, clients: Clients | None) -> dict[str, Any]:
        self.state = None
        try:
            return self._train(ckpt, path, C, clients)
        except RunInterrupted as exc:
            exc.message = self.interrupted_message(exc, ckpt)
            raise

    def _train(self, ckpt: dict[str, Any] | None, path: Path | None, C: int, clients: Clients | None) -> dict[str, Any]:
        ignored = self.ignored_trainer_settings()
        if ignored:
            self.log_console.print(
                f"[yellow]ignored: {', '.join(ignored)}: the federation sets each client's budget "
                "(federation.local_epochs or local_steps), writes the checkpoints (federation.checkpoint_*) "
                "and shows the progress[/]"
            )
        remove_interrupted_writes(
            self.root, layout.checkpoints(self.root), *sorted((self.root / layout.CLIENTS).glob("client*"))
        )
        data_here = clients is None
        if data_here:
            self.dm.setup("fit")
            clients = InProcessClients(self.client_runtime(), self.dm.num_clients)
        self.clients = clients
        run = self.context = RunContext(
            self.fed,
            self.module,
            self.dm,
            self.root,
            self.seed,
            self.config_text,
            self.loggers,
            self.console,
            self.log_console,
            self.trainer_kwargs,
            states_come_back=clients.states_come_back,
        )
        if data_here:
            self.check_data()
        if self.config_text:
            atomic_write_text(self.config_text, self.root / layout.CONFIG)
        state = self.start_state(ckpt, path, C, clients)
        state.privacy_settings = self.fed.privacy.settings() if self.fed.privacy is not None else None
        clients.noise_multiplier = self.fed.privacy.noise_multiplier if self.fed.privacy is not None else None
        self.state = clients.run_state = state

        self.train_rounds(run, state)
        self.module.cpu()  # client Trainers kept it on their device; what the run leaves is on the CPU
        self.fed.mode.final_weights(state, self.module)
        summary: dict[str, Any] = {}
        for h in self.hooks:
            h.on_run_end(run, state, summary)
        return summary

    def start_state(self, ckpt: dict[str, Any] | None, path: Path | None, C: int, clients: Clients) -> RunState:
        """A fresh run's state, or the resumed one: weights, client states, RNG and logs put back
        as the checkpoint left them."""
        if ckpt is None:
            state = RunState(C, {k: v.cpu() for k, v in self.module.global_state().items()})
        else:
            state = RunState.from_checkpoint(ckpt)
            state.checkpointed = state.round
            if self.fed.privacy is not None and "privacy" not in ckpt and state.round:
                # a checkpoint from before the ledger: its rounds count at this config's noise
                state.privacy_ledger = [list(self.fed.privacy.release()) for _ in range(state.round)]
                self.log_console.print(
                    f"[yellow]{path} predates the privacy ledger: its {state.round} round(s) are counted at this "
                    "config's noise multiplier[/]"
                )
            self.module.load_global_state(state.global_w)
            if clients.states_come_back:
                clients.load_states(client_states_of(ckpt, self.root))
            set_rng_state(ckpt["rng"])
            self.log_console.print(f"[bold]resuming[/] from {path} after round {state.round}/{self.fed.rounds}")
            continue_csv_logs(self.loggers, state.round)
        return state

    def train_rounds(self, run: RunContext, state: RunState) -> None:
        """The rounds left, between the hooks' start and teardown (in reverse; on an error too)."""
        hooks, started = self.hooks, []
        try:
            for h in hooks:
                started.append(h)
                h.on_run_start(run, state)
            for r in range(state.round, self.fed.rounds):
                self.train_round(r, state, hooks)
        except BaseException as exc:
            for h in reversed(started):
                try:
                    h.teardown(run, exc)
                except Exception:  # the run's own error is the one to report
                    log.debug("teardown of %s failed", type(h).__name__, exc_info=True)
            raise
        for h in reversed(started):
            h.teardown(run, None)

    def client_steps(self) -> int | None:
        """The optimiser steps a client takes over the run, when the config fixes them
        (``federation.local_steps``; at most this many when clients are sampled)."""
        return None if self.fed.local_steps is None else self.fed.rounds * self.fed.local_steps

    def check_data(self) -> None:
        """The checks that need the loaded data (the module's and the hooks'), before anything is
        written; the in-process run and every Flower site run them."""
        if self.fed.select_best and not any(self.dm.validation_volumes(c) for c in range(self.dm.num_clients)):
            raise ConfigError(
                "federation.select_best needs labelled validation patients (data.val_fraction > 0 or data.cv_folds)"
            )
        self.module.check_data(self.dm, self.client_steps(), self.log_console)
        if self.context is not None:
            for h in self.hooks:
                h.check_data(self.context)

    def train_round(self, r: int, state: RunState, hooks: list[RoundHook]) -> None:
        """Round ``r`` (0-based), the paper's round: select clients, train each from the global
        weights (its own in local mode) and its remote features, aggregate, route the features."""
        for h in hooks:
            h.on_round_start(self.context, state, r)
        t0 = state.round_started = time.perf_counter()
        wanted = self.select_clients(r, state.num_clients)
        starts = {c: self.start_weights(c, state) for c in wanted}

        def show(i: int, c: int, n: int = len(wanted)) -> None:  # Flower sends all n at once
            for h in hooks:
                h.on_client_start(self.context, r, i, c, n)

        results = self.clients.train_round(r, starts, {c: state.inbox[c] for c in wanted}, show)
        selected = sorted(results)
        if len(selected) < self.fed.min_clients:
            raise RuntimeError(
                f"round {r + 1}: only {len(selected)} of {len(wanted)} clients replied "
                f"(federation.min_clients is {self.fed.min_clients})"
            )
        for c in sorted(set(wanted) - set(selected)):
            self.console.print(
                f"[yellow]round {r + 1}: client {c} left out of this round "
                f"({self.clients.failures.get(c, 'no reply')})[/]"
            )
        t_train = time.perf_counter() - t0

        t1 = time.perf_counter()
        self.aggregate(state, {c: results[c] for c in selected})
        t_agg = time.perf_counter() - t1
        if any(res.features is not None for res in results.values()):
            dim = next(int(res.features.vectors.shape[1]) for res in results.values())
            state.inbox = route({c: results[c].features for c in selected}, dim, recipients=range(state.num_clients))
        state.finish_round(r, {c: results[c].state for c in selected})
        state.elapsed += time.perf_counter() - t0

        metrics = train_metrics({c: results[c] for c in selected})
        metrics.update({"round/time/train_s": t_train, "round/time/aggregate_s": t_agg, "round": r + 1})
        p = self.fed.privacy
        if p is not None or state.privacy_ledger:  # a client that sent in every round so far (an upper bound)
            state.privacy_ledger.append(list(p.release()) if p is not None else [None, 1])
            delta, kind = (p.delta, p.accountant) if p is not None else (1e-5, "rdp")
            metrics["round/privacy/epsilon"] = spent_epsilon(state.privacy_spent, delta, kind)
        for h in hooks:
            h.on_round_end(self.context, state, results, metrics)
        state.record(metrics)
        for h in hooks:
            h.on_round_recorded(self.context, state, metrics)

    def start_weights(self, client: int, state: RunState) -> dict[str, torch.Tensor]:
        """What ``client`` trains from (the mode decides: the global weights, or its own)."""
        return self.fed.mode.start_weights(client, state, self.module)

    def aggregate(self, state: RunState, results: dict[int, ClientResult]) -> None:
        """The mode's merge of the round's updates (FedAvg by the aggregator plug-in, or each
        client keeping its own)."""
        self.fed.mode.aggregate(self.fed, state, results)

    def validate(
        self, ckpt: dict[str, Any] | None, path: Path | None, num_clients: int, states_here: bool = True
    ) -> None:
        """The checks that need no data: image size against the encoder's depth, the output
        folder, and a checkpoint to resume from against the config (clients, rounds, shapes and,
        ``states_here``, the client state files it names)."""
        size, multiple = getattr(self.dm, "img_size", None), self.module.input_multiple
        if size is not None and size % multiple:
            raise ConfigError(
                f"data.img_size={size} must be a multiple of {multiple}: the encoder halves the image "
                f"{multiple.bit_length() - 1} times (model features); try {max(multiple, round(size / multiple) * multiple)}"
            )
        smallest = self.module.min_input_size
        if size is not None and size < smallest:
            raise ConfigError(
                f"data.img_size={size} leaves the encoder's bottleneck {size // multiple} x {size // multiple} "
                f"pixels ({multiple.bit_length()} encoder levels halve it {multiple.bit_length() - 1} times) and "
                f"instance norm needs more than one value per channel: the smallest size is {smallest} "
                "(or use fewer model.features levels, or model.norm batch)"
            )
        if self.fed.select_best and self.fed.mode.global_model:
            raise ConfigError("federation.select_best needs federation.mode local")
        if self.fed.min_clients > num_clients:
            raise ConfigError(
                f"federation.min_clients={self.fed.min_clients} is above the run's {num_clients} clients: every round would fail"
            )
        self.fed.mode.check(self.fed, self.module)
        check_writable(self.root)
        if ckpt is None:
            return
        check_checkpoint(ckpt, path, num_clients, self.fed.rounds, self.module, self.root if states_here else None)
        self.check_privacy(ckpt, path)

    def check_fresh_folder(self) -> None:
        """A new run goes into a folder that holds no other run's round files (checked under the
        folder's lock, so a live run there is reported as such first)."""
        ckdir = layout.checkpoints(self.root)
        earlier = sorted(ckdir.glob("round-*.ckpt")) or sorted(ckdir.glob(layout.LAST))
        if earlier:
            raise ConfigError(
                f"{self.root} already holds a run (checkpoints/{earlier[-1].name}): resume it with "
                "--ckpt_path last, or give the new run another --trainer.default_root_dir (or delete that "
                "folder): one folder holds one run"
            )

    def check_privacy(self, ckpt: dict[str, Any], path: Path | None) -> None:
        """A resume keeps the privacy settings of the run it resumes (or says it goes on under new
        ones: ``federation.privacy_change``); with a target epsilon the remaining rounds are noised
        so that the whole run, its rounds before the checkpoint included, meets the target."""
        p, record = self.fed.privacy, ckpt.get("privacy")
        if record is None:  # a checkpoint from before the ledger: nothing to compare (see _train)
            return
        old, new = record.get("settings"), (p.settings() if p is not None else None)
        if old != new and self.fed.privacy_change != "continue":
            changed = (
                "turns privacy off"
                if new is None
                else "turns privacy on"
                if old is None
                else "changes " + ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in new.items() if old.get(k) != v)
            )
            raise ConfigError(
                f"this resume {changed} against the run in {path}: resume with its federation.privacy, or set "
                "federation.privacy_change=continue to go on under the new settings (the epsilon reported then "
                "composes both parts)"
            )
        spent = [(None if z is None else float(z), int(n)) for z, n in record.get("ledger", [])]
        # the rounds done were noised as this config's calibration would noise them (same rounds,
        # same target): the run goes on with that noise, bitwise as if uninterrupted; else the
        # remaining rounds are noised so that the whole run meets the target
        same = all(z == p.noise_multiplier for z, _ in spent) if p is not None else True
        if p is not None and p.target_epsilon is not None and spent and not same:
            p.calibrate(self.fed.rounds - int(ckpt["round"]), spent)


def train_metrics(results: dict[int, ClientResult]) -> dict[str, float]:
    """``round/<key>``: the clients' training and validation figures weighted by their training
    volumes, ``client<c>/<key>`` each client's own; the clients and volumes of the round."""
    m: dict[str, float] = {}
    for k in sorted({k for r in results.values() for k in r.metrics}):
        vals = [(r.metrics[k], r.num_samples) for r in results.values() if k in r.metrics]
        m[f"round/{k}"] = sum(v * n for v, n in vals) / max(1, sum(n for _, n in vals))
        for c, r in results.items():
            if k in r.metrics:
                m[f"client{c}/{k}"] = r.metrics[k]
    m["round/clients"] = len(results)
    m["round/train_volumes"] = sum(r.num_samples for r in results.values())
    return m
