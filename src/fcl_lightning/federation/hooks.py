"""Round hooks: everything a federated run does besides the round itself (Lightning-callback style):
the protocol, :class:`RoundHook`, and the engine's own hooks (what a hook sees, :class:`RunContext`,
is in ``state.py``).

The round engine (:class:`~fcl_lightning.federation.loop.FederatedLoop`) selects clients, trains
them, aggregates and routes the exchanged features; these hooks count bytes, measure the monitors,
run the downstream evaluation, write checkpoints, export the encoder and the summary, and report
(loggers, progress bar, round lines). Add your own under ``federation.hooks`` with ``class_path``.
"""

from __future__ import annotations

import json
import logging
import time
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.networks.utils import eval_mode
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fcl_lightning import layout
from fcl_lightning.data.volume import DataError
from fcl_lightning.fcl.aggregate import state_nbytes
from fcl_lightning.fcl.exchange import payload_nbytes
from fcl_lightning.federation.checkpoint import (
    BackgroundWriter,
    CheckpointError,
    client_files,
    load_round_versions,
    retention,
    rng_state,
    save_checkpoint_file,
    snapshot,
    to_cpu,
    update_summary,
)
from fcl_lightning.federation.state import RunContext, RunState
from fcl_lightning.io import WriteError, atomic_link, atomic_save
from fcl_lightning.tracking import (
    csv_version,
    finish,
    log_config,
    log_dice_table,
    log_images,
    log_summary,
    wandb_run_id,
)

if TYPE_CHECKING:
    from fcl_lightning.downstream import DownstreamEvaluation

log = logging.getLogger(__name__)


class RoundHook:
    """A hook of the round engine (Lightning-callback style); every method is optional. Per round:
    ``on_round_start``, ``on_client_start`` per client, ``on_round_end`` (add to ``metrics``), then
    the engine records the round in ``state.history``, then ``on_round_recorded`` (write, report).
    ``run`` is the :class:`RunContext`."""

    def check_data(self, run: RunContext) -> None:
        """After the data is loaded, before anything is written: raise a ``DataError`` if the
        data cannot serve this hook (runs where the clients' data is in this process)."""

    def on_run_start(self, run: RunContext, state: RunState) -> None:
        """Before the first round to run (``state.round`` rounds are already done on a resume)."""

    def on_round_start(self, run: RunContext, state: RunState, round_idx: int) -> None:
        """Before round ``round_idx`` (0-based) trains."""

    def on_client_start(self, run: RunContext, round_idx: int, i: int, client: int, n: int) -> None:
        """Before client ``client`` (the ``i``-th of ``n`` this round) trains."""

    def on_round_end(
        self, run: RunContext, state: RunState, results: dict[int, Any], metrics: dict[str, float]
    ) -> None:
        """After aggregation and routing of round ``state.round``: add figures to ``metrics``
        (``results``: client -> :class:`~fcl_lightning.federation.client.ClientResult`)."""

    def on_round_recorded(self, run: RunContext, state: RunState, metrics: dict[str, float]) -> None:
        """After the round is in ``state.history``: write and report it."""

    def on_run_end(self, run: RunContext, state: RunState, summary: dict[str, Any]) -> None:
        """After the last round (the run's weights are in the module): add to ``summary``."""

    def teardown(self, run: RunContext, error: BaseException | None) -> None:
        """Always, last hook first, also when the run fails (``error``); release what it holds."""


class CommCounter(RoundHook):
    """Bytes each client sent and received (weights and features), per round and in total."""

    def on_round_end(self, run, state, results, metrics) -> None:
        federated = run.fed.mode.global_model  # weights travel only when one model is trained
        up = down = feat_up = 0
        for c in sorted(results):
            w_down = state_nbytes(state.global_w) if federated else 0
            w_up = state_nbytes(results[c].update) if federated else 0
            f_up = payload_nbytes(results[c].features) if results[c].features is not None else 0
            metrics[f"client{c}/comm/weights_down_bytes"] = w_down
            metrics[f"client{c}/comm/weights_up_bytes"] = w_up
            metrics[f"client{c}/comm/features_up_bytes"] = f_up
            up, down, feat_up = up + w_up, down + w_down, feat_up + f_up
        state.comm["weights_up"] += up
        state.comm["weights_down"] += down
        state.comm["features_up"] += feat_up
        metrics.update(
            {
                "round/comm/weights_up_bytes": up,
                "round/comm/weights_down_bytes": down,
                "round/comm/features_up_bytes": feat_up,
            }
        )
        if any(res.features is not None for res in results.values()):
            for c in range(state.num_clients):
                nb = payload_nbytes(state.inbox[c]) if state.inbox[c] is not None else 0
                metrics[f"client{c}/comm/features_down_bytes"] = nb
                state.comm["features_down"] += nb
            metrics["round/comm/features_down_bytes"] = sum(
                metrics[f"client{c}/comm/features_down_bytes"] for c in range(state.num_clients)
            )


class MonitorHook(RoundHook):
    """``round/monitor/*``: the collapse and learning monitors (``federation.monitor``) of the
    global encoder, at initialisation and after the rounds the monitor is due."""

    def __init__(self) -> None:
        self._probe: tuple[list, bool] | None = None
        self._chosen = False  # the probe set is chosen once, at its first use

    def on_run_start(self, run, state) -> None:
        if state.round == 0:  # the monitors at initialisation: the baseline the rounds are read against
            init = self.measure(run, 0, state.global_w)
            if init:
                run.log_metrics({**init, "round": 0}, step=0)
                run.console.print(
                    f"round   0 | at initialisation | probe {init['round/monitor/probe_acc']:.2f} | "
                    f"spread {init['round/monitor/spread']:.2f}",
                    soft_wrap=True,
                )

    def on_round_end(self, run, state, results, metrics) -> None:
        metrics.update(self.measure(run, state.round, state.global_w))

    def probe_set(self, dm: Any, max_volumes: int) -> tuple[list, bool] | None:
        """The fixed probe set: the first ``max_volumes`` held-out volumes (validation patients of
        every client, interleaved, then the test set), else training volumes (with a warning); and
        whether they are held out. ``None``: no data here (a Flower server) or fewer than two
        patients (no leave-one-patient-out probe)."""
        if not self._chosen:
            self._chosen = True
            if dm.ready:

                def interleaved(groups: list) -> list:
                    return [v for vs in zip_longest(*groups) for v in vs if v is not None]

                held = (interleaved(dm.val) + list(dm.test))[:max_volumes]
                for vols, held_out in ((held, True), (interleaved(dm.train)[:max_volumes], False)):
                    if len({v.record.patient for v in vols}) >= 2:
                        self._probe = (vols, held_out)
                        break
                if self._probe is not None and not self._probe[1]:
                    log.warning(
                        "monitor: no held-out patients (data.val_fraction is 0 and no test_source); the "
                        "partition probe scores training patients (leave-one-patient-out)"
                    )
        return self._probe

    def measure(self, run: RunContext, done: int, global_w: dict[str, torch.Tensor]) -> dict[str, float]:
        mon, module = run.fed.monitor, run.module
        features = getattr(module, "probe_features", None)
        if mon is None or features is None or not run.fed.mode.global_model or not mon.due(done, run.fed.rounds):
            return {}
        probe = self.probe_set(run.dm, mon.max_volumes)
        if probe is None:
            return {}
        vols, held_out = probe
        module.load_global_state(global_w)
        with eval_mode(module):
            figures = mon.measure(
                features,
                [v.image for v in vols],
                [v.record.patient for v in vols],
                run.dm.num_partitions,
                device=next(module.parameters()).device,
            )
        out = {f"round/monitor/{k}": v for k, v in figures.items()}
        out["round/monitor/probe_held_out"] = float(held_out)
        out["round/monitor/collapsed"] = float(figures["spread"] < mon.collapse_spread)
        return out


class DownstreamHook(RoundHook):
    """``downstream/*``: brief fine-tuning from the global encoder and from random init
    (``federation.downstream``), every ``every_n_rounds`` and after the last round; federated
    pre-training only."""

    def __init__(self, evaluation: DownstreamEvaluation) -> None:
        self.evaluation = evaluation

    def applies(self, run: RunContext) -> bool:
        return run.fed.mode.global_model and run.module.stage == "pretrain"

    def check_data(self, run) -> None:
        """Every client it fine-tunes has the labelled (and, semi-supervised, unlabelled) training
        scans and labelled held-out scans it needs: said now, not after the last round."""
        if not self.applies(run):
            return
        ev = self.evaluation
        outside = [c for c in ev.clients or [] if not 0 <= c < run.dm.num_clients]
        if outside:
            raise DataError(
                f"federation.downstream.clients {outside} are outside the run's {run.dm.num_clients} clients "
                f"(0..{run.dm.num_clients - 1})"
            )
        run.dm.check_finetune(ev.labelled_per_client, unlabelled=ev.semi is not None)
        for c in ev.clients if ev.clients is not None else range(run.dm.num_clients):
            if not run.dm.eval_volumes(c):
                raise DataError(
                    f"federation.downstream: client {c} has no labelled held-out scan to score "
                    "(set data.test_source, data.val_fraction > 0 or data.cv_folds)"
                )
        warning = ev.semi.ramp_warning(ev.steps) if ev.semi is not None else None
        if warning:
            run.log_console.print(f"[yellow]warning: federation.downstream: {warning}[/]", soft_wrap=True)

    def on_run_start(self, run, state) -> None:
        if self.applies(run):  # a missing paired init fails now, not after the last round
            self.evaluation.check_start(run.root)

    def run(self, run: RunContext, state: RunState, final: bool) -> dict[str, float]:
        run.module.load_global_state(state.global_w)
        return self.evaluation.run(
            run.module, run.dm, run.root, run.seed, run.console, final=final, trainer_kwargs=run.trainer_kwargs
        )

    def on_round_end(self, run, state, results, metrics) -> None:
        every = self.evaluation.every_n_rounds
        if every and state.round % every == 0 and state.round < run.fed.rounds and self.applies(run):
            metrics.update(self.run(run, state, final=False))

    def on_run_end(self, run, state, summary) -> None:
        if not self.applies(run):
            return
        t0 = time.perf_counter()
        down = self.run(run, state, final=True)
        down["downstream/time_s"] = time.perf_counter() - t0
        run.log_metrics(down, step=run.fed.rounds)
        update_summary(run.root, down)
        summary.update(down)
        state.record_dice(down, run.fed.rounds)
        log_dice_table(run.loggers, state.dice_rows, step=run.fed.rounds)
        log_images(
            run.loggers,
            {"downstream/examples": run.root / "downstream.png", "downstream/embedding": run.root / "embedding.png"},
            step=run.fed.rounds,
        )


class CheckpointHook(RoundHook):
    """Every ``federation.checkpoint_every`` rounds and after the last: the clients' states
    handed back since the previous write (in-process clients: ``clients/client<c>/``, each under
    the round it trained in), then the server's ``round-NNN.ckpt``, linked as
    ``checkpoints/last.ckpt``; then the round files and client states that
    ``federation.checkpoint_keep`` does not keep go. Written in the background while the next
    round trains (``federation.checkpoint_async``); a write error stops the run at the next round
    at the latest. Client files are in place before the server file that names them
    (:mod:`fcl_lightning.federation.state`: the commit). Between writes a stopped run resumes
    from the last one and trains the rounds after it again, bitwise (the file holds the RNG)."""

    def on_run_start(self, run, state) -> None:
        self.wandb_id = wandb_run_id(run.loggers)  # stored in checkpoints: a resume continues this run
        self.writer = BackgroundWriter(run.fed.checkpoint_async, on_done=lambda done: self.written_round(state, *done))
        self.written: dict[str, Any] | None = None  # the last job handed to the writer (buffers reused)
        self.pending: dict[int, Any] = {}  # client -> its newest state not written yet
        ckdir = layout.checkpoints(run.root)
        # round -> client versions of the round files retention decides about: this run's, and on
        # a resume the ones on disk up to where it resumes (later ones are written again)
        self.index = {r: v for r, v in load_round_versions(ckdir).items() if r <= state.round} if state.round else {}

    def on_round_start(self, run, state, round_idx) -> None:
        self.writer.check()  # the previous round's checkpoint failed: stop before training on

    def on_round_recorded(self, run, state, metrics) -> None:
        t0 = time.perf_counter()
        self.save(run, state)
        metrics["round/time/checkpoint_s"] = time.perf_counter() - t0

    def teardown(self, run, error) -> None:
        # the last checkpoint is on disk (or its error raised) before the run goes on
        self.writer.__exit__(type(error) if error else None, error, None)

    def save(self, run: RunContext, state: RunState) -> None:
        done, fed = state.round, run.fed
        self.pending.update(state.fresh_states)  # a state kept in memory is not changed until its client trains
        if done % fed.checkpoint_every and done != fed.rounds:
            return
        ckpt = state.checkpoint(
            rounds=fed.rounds,
            module=type(run.module).__name__,
            rng=rng_state(),
            seed=run.seed,
            config=run.config_text,
            wandb_run_id=self.wandb_id,
            csv_version=csv_version(run.loggers),
        )
        job, self.pending = {"server": ckpt, "clients": self.pending}, {}
        # both rebuild every dict and list (the loop appends to history later); in the background,
        # tensors are copied too, into the previous job's buffers once its write is done, because
        # the next round mutates some of them in place (Adam's moments, the momentum nets, banks)
        if self.writer.enabled:
            self.writer.wait()
            job = snapshot(job, into=self.written)
            self.written = job
        else:
            job = to_cpu(job)
        ckdir = layout.checkpoints(run.root)
        versions = dict(state.client_versions)

        def write() -> tuple[int, dict[int, int]]:
            """On the writer's thread: touches the files and this hook's index, never ``state``."""
            try:
                for c, client_state in sorted(job["clients"].items()):
                    client_files(run.root, c).save(versions[c], client_state, save=save_checkpoint_file)
                # serialise once; last.ckpt is a link to the round file
                atomic_link(
                    save_checkpoint_file(job["server"], layout.round_file(run.root, done)), layout.last(run.root)
                )
                self.index[done] = versions
            except (CheckpointError, WriteError) as err:
                before = f"round {prev}'s (--ckpt_path last resumes there)" if prev else "none"
                raise type(err)(f"round {done}'s checkpoint: {err}; the last whole checkpoint is {before}") from err
            return done, self.retain(run, ckdir, versions)

        prev = state.checkpointed  # the previous write's, handed over by the wait above (inline: at once)
        self.writer.submit(write)

    @staticmethod
    def written_round(state: RunState, done: int, keep_from: dict[int, int]) -> None:
        """A write finished (handed over on the loop's thread): round ``done`` is whole on disk
        (what an interrupted run reports) and each client's states older than ``keep_from`` are gone."""
        state.checkpointed, state.keep_from = done, keep_from

    def retain(self, run: RunContext, ckdir: Path, current: dict[int, int]) -> dict[int, int]:
        """Delete the round files ``federation.checkpoint_keep`` does not keep and the client
        states no file kept whole names; return client -> its oldest state still named."""
        whole, weights = retention(list(self.index), run.fed.checkpoint_keep, run.fed.rounds)
        for r in sorted(set(self.index) - whole - weights):
            layout.round_file(run.root, r).unlink(missing_ok=True)
            del self.index[r]
        keep_from = dict(current)  # last.ckpt names the current ones
        for r in whole:
            for c, v in self.index[r].items():
                keep_from[c] = min(v, keep_from.get(c, v))
        if run.states_come_back:
            for c, v in keep_from.items():
                client_files(run.root, c).prune(v)
        return keep_from


class ExportHook(RoundHook):
    """What the stage leaves behind: ``encoder.pt`` (pre-training; in local mode one encoder per
    client under ``encoders/`` and their FedAvg) and its entry in ``summary.json``; and, when a
    pre-training starts, ``encoder_init.pt``: the weights it starts from, the paired random init
    that isolates what pre-training changed (``downstream.random_init: start``, ``METHOD@0`` in
    ``run_tables.py``)."""

    def on_run_start(self, run, state) -> None:
        if state.round == 0 and run.module.stage == "pretrain":
            encoder = run.module.encoder_state()
            if encoder is not None:
                atomic_save(encoder, run.root / layout.INIT_ENCODER)

    def on_run_end(self, run, state, summary) -> None:
        module, root = run.module, run.root
        run.fed.mode.export(root, state, module, run.fed, run.dm)
        last = state.history[-1] if state.history else {}
        summary.update(
            {
                "stage": type(module).__name__,
                "rounds_completed": len(state.history),
                "final": {
                    k[len("round/") :]: v
                    for k, v in last.items()
                    if k.startswith(("round/train/", "round/val/", "round/monitor/"))
                },
                "bytes": dict(state.comm),
                "wall_time_s": state.elapsed,
            }
        )
        if run.fed.privacy is not None:
            nparts = getattr(run.dm, "num_partitions", None)
            summary["privacy"] = run.fed.privacy.summary(len(state.history), nparts, spent=state.privacy_spent)
            summary["privacy"]["noise_multipliers"] = sorted({z for z, _ in state.privacy_ledger if z is not None})
        elif state.privacy_ledger:  # turned off on a resume: what was sent since carried no noise
            summary["privacy"] = {
                "epsilon": float("inf"),
                "rounds": len(state.privacy_ledger),
                "off_from_round": 1 + next(i for i, (z, _) in enumerate(state.privacy_ledger) if z is None),
            }
        update_summary(root, {module.stage: dict(summary)})


class ReportHook(RoundHook):
    """The loggers (every round's metrics, flushed each round so a killed run keeps its rows;
    the config and the summary for wandb), the progress bar (stderr) and the round lines and
    outputs line (stdout)."""

    def on_run_start(self, run, state) -> None:
        log_config(run.loggers, run.config_text)
        self.progress = Progress(
            TextColumn("[bold]FCL[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=run.log_console,
            transient=True,
            disable=not run.log_console.is_terminal,
            refresh_per_second=2,  # its refresh thread takes the GIL from training: twice a second is plenty
        )
        self.progress.start()
        self.task = self.progress.add_task("rounds", total=run.fed.rounds, completed=state.round, info="")

    def on_client_start(self, run, round_idx, i, client, n) -> None:
        self.progress.update(self.task, info=f"round {round_idx + 1}/{run.fed.rounds} client {i + 1}/{n} (#{client})")

    def on_round_recorded(self, run, state, metrics) -> None:
        metrics["round/time/total_s"] = time.perf_counter() - state.round_started
        state.history[-1].update(
            {k: metrics[k] for k in ("round/time/checkpoint_s", "round/time/total_s") if k in metrics}
        )
        run.log_metrics(metrics, step=state.round)
        for lg in run.loggers:  # every round on disk: a killed run keeps its rows
            lg.save()
        if state.new_dice_rows:
            log_dice_table(run.loggers, state.dice_rows, step=state.round)
        loss = metrics.get("round/train/loss", float("nan"))
        self.progress.update(self.task, advance=1, info=f"round {state.round}/{run.fed.rounds} loss {loss:.4f}")
        run.console.print(round_line(state.round, metrics), soft_wrap=True)

    def teardown(self, run, error) -> None:
        self.progress.stop()

    def on_run_end(self, run, state, summary) -> None:
        log_summary(run.loggers, json.loads((run.root / layout.SUMMARY).read_text()))
        outputs = (
            layout.ENCODER, layout.INIT_ENCODER, f"{layout.ENCODERS}/", layout.SUMMARY, f"{layout.CHECKPOINTS}/",
            f"{layout.LOGS}/", "downstream.png",
        )  # fmt: skip
        run.console.print(
            f"outputs in {run.root}: " + ", ".join(n for n in outputs if (run.root / n).exists()), soft_wrap=True
        )
        for lg in run.loggers:
            lg.save()
        finish(run.loggers)


def round_line(done: int, m: dict[str, float]) -> str:
    """One line per round: losses, monitors, traffic, time."""
    parts = [f"round {done:>3}"]
    for key, label, digits in (
        ("round/train/loss", "loss", 4),
        ("round/train/loss_local", "local", 4),
        ("round/train/loss_remote", "remote", 4),
        ("round/train/loss_dense", "dense", 4),
        ("round/train/sup", "supervised", 4),
        ("round/train/unsup", "unlabelled", 4),
        ("round/train/unsup_weight", "x", 4),
        ("round/val/dice_mean", "val Dice", 3),
        ("round/monitor/probe_acc", "probe", 2),
        ("round/monitor/spread", "spread", 2),
    ):
        if key in m:
            parts.append(f"{label} {m[key]:.{digits}f}")
        if label == "remote" and key in m and "round/train/remote_in_loss" in m:
            # the remote term is the mean over the steps whose banks held negatives; while they were
            # empty (round 1's first steps) it added nothing: show what it added, so the parts add up
            added, mean = m["round/train/remote_in_loss"], m[key]
            if abs(added - mean) > 5e-5 * max(1.0, abs(mean)):
                share = added / mean if mean else 0.0
                parts[-1] = f"remote {added:.4f} ({mean:.4f} on the {share:.0%} of steps with negatives in the bank)"
    if m.get("round/monitor/collapsed"):
        parts.append("[bold red]COLLAPSED: every slice embeds to nearly the same vector[/]")
    up = m.get("round/comm/weights_up_bytes", 0) / 2**20
    down = m.get("round/comm/weights_down_bytes", 0) / 2**20
    feats = m.get("round/comm/features_up_bytes", 0) / 2**10
    parts.append(f"weights up {up:.1f} / down {down:.1f} MiB, features shared {feats:.0f} KiB")
    if "round/privacy/epsilon" in m:
        parts.append(f"epsilon {m['round/privacy/epsilon']:.2f}")
    parts.append(f"{m['round/time/total_s']:.1f} s")
    return " | ".join(parts)
