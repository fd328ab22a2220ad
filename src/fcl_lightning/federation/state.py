"""The run's state: what the round engine carries from round to round (:class:`RunState`, with
the server's round checkpoint made from it and read back: :meth:`RunState.checkpoint`,
:meth:`RunState.from_checkpoint`), what a round hook sees of a run (:class:`RunContext`) and of
its data (:class:`FederatedData`). The checkpoint files themselves (format, reading, checking,
writing, retention, the clients' state files) are :mod:`fcl_lightning.federation.checkpoint`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from fcl_lightning.federation.checkpoint import FORMAT, CheckpointKeep, bank_from_dict, bank_to_dict, versions_of
from fcl_lightning.tracking import per_client_dice_rows

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger
    from rich.console import Console

    from fcl_lightning.lit.base import FederatedModule


@dataclass
class RunState:
    """What the round engine carries from round to round; the server's checkpoint holds all of
    it but the clients' own states, which it names by version (``client_versions``)."""

    num_clients: int
    global_w: dict[str, torch.Tensor]
    client_w: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    #: select_best: client -> (best validation Dice, its weights)
    best: dict[int, tuple[float, dict[str, torch.Tensor]]] = field(default_factory=dict)
    inbox: dict[int, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    #: per-round, per-client Dice rows (a wandb table when wandb is on)
    dice_rows: list[list[Any]] = field(default_factory=list)
    new_dice_rows: list[list[Any]] = field(default_factory=list)
    comm: dict[str, int] = field(
        default_factory=lambda: {"weights_down": 0, "weights_up": 0, "features_down": 0, "features_up": 0}
    )
    round: int = 0  # rounds done
    #: client -> the rounds done when its current state was saved (absent: a fresh client)
    client_versions: dict[int, int] = field(default_factory=dict)
    #: client -> its oldest state a checkpoint kept whole still names (older ones may go)
    keep_from: dict[int, int] = field(default_factory=dict)
    #: the states the clients that trained in this process handed back this round, to be saved
    fresh_states: dict[int, Any] = field(default_factory=dict)
    #: the last round whose checkpoint is whole on disk (``None``: none yet)
    checkpointed: int | None = None
    #: per round done, what each client released under federation.privacy: [noise multiplier, releases]
    #: (``None``: sent without noise after privacy was turned off on a resume); empty: never private
    privacy_ledger: list[list[Any]] = field(default_factory=list)
    #: the federation.privacy settings the run trains under (``None``: off)
    privacy_settings: dict[str, Any] | None = None
    elapsed: float = 0.0  # seconds of training rounds (monitors, downstream runs, checkpoints excluded)
    round_started: float = 0.0

    def __post_init__(self) -> None:
        self.inbox = {c: self.inbox.get(c) for c in range(self.num_clients)}

    def finish_round(self, r: int, trained: dict[int, Any | None]) -> None:
        """Round ``r`` (0-based) is done: each client in ``trained`` now has the state it saved
        after it (``None``: saved where it trained, e.g. a Flower node; else to be saved here)."""
        self.round = r + 1
        self.fresh_states = {c: s for c, s in trained.items() if s is not None}
        self.client_versions.update({c: self.round for c in trained})

    def checkpoint(self, **run: Any) -> dict[str, Any]:
        """The server's round checkpoint (no client state; ``run``: the run's own entries: rounds,
        module, seed, config, rng, wandb and CSV ids)."""
        return {
            "format": FORMAT,
            "round": self.round,
            "num_clients": self.num_clients,
            "global": self.global_w,
            "client_weights": {str(c): w for c, w in self.client_w.items()},
            "client_versions": {str(c): v for c, v in self.client_versions.items()},
            "inbox": {str(c): bank_to_dict(b) for c, b in self.inbox.items() if b is not None},
            "history": self.history,
            "comm": self.comm,
            "elapsed_s": self.elapsed,
            "dice_rows": self.dice_rows,
            # select_best: each client's weights from its round with the best validation Dice (what `test` scores)
            "best_client_weights": {str(c): w for c, (_, w) in self.best.items()},
            "best_val_dice": {str(c): d for c, (d, _) in self.best.items()},
            "privacy": {"settings": self.privacy_settings, "ledger": self.privacy_ledger},
            **run,
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> RunState:
        C = int(ckpt["num_clients"])
        return cls(
            num_clients=C,
            global_w=ckpt["global"],
            client_w={int(c): w for c, w in ckpt["client_weights"].items()},
            best={int(c): (float(ckpt["best_val_dice"][c]), w) for c, w in ckpt.get("best_client_weights", {}).items()},
            inbox={c: bank_from_dict(ckpt["inbox"].get(str(c))) for c in range(C)},
            history=ckpt["history"],
            dice_rows=[list(r) for r in ckpt.get("dice_rows", [])],
            comm=ckpt["comm"],
            round=int(ckpt["round"]),
            client_versions=versions_of(ckpt),
            elapsed=float(ckpt["elapsed_s"]),
            privacy_ledger=[list(e) for e in (ckpt.get("privacy") or {}).get("ledger", [])],
            privacy_settings=(ckpt.get("privacy") or {}).get("settings"),
        )

    @property
    def privacy_spent(self) -> list[tuple[float | None, int]]:
        """The ledger as the accountant reads it: (noise multiplier, releases) per round."""
        return [(None if z is None else float(z), int(n)) for z, n in self.privacy_ledger]

    def record(self, metrics: dict[str, float]) -> None:
        """The round's ``round/`` (and ``downstream/``) figures into the history, its Dice rows
        into the table."""
        self.history.append({k: float(v) for k, v in metrics.items() if k.startswith(("round/", "downstream/"))})
        self.record_dice(metrics, self.round)

    def record_dice(self, metrics: dict[str, float], round_idx: int) -> None:
        self.new_dice_rows = per_client_dice_rows(metrics, round_idx)
        self.dice_rows += self.new_dice_rows


@runtime_checkable
class FederatedData(Protocol):
    """What the round engine and its hooks need of a datamodule
    (:class:`~fcl_lightning.data.datamodule.FederatedDataModule` has it all)."""

    num_clients: int
    num_partitions: int
    #: per client, its training / validation volumes; the shared test volumes
    train: Sequence[Sequence[Any]]
    val: Sequence[Sequence[Any]]
    test: Sequence[Any]

    @property
    def ready(self) -> bool:
        """Whether the volumes are loaded (a Flower server's datamodule never is)."""
        ...

    def setup(self, stage: str | None = None) -> None: ...

    def validation_volumes(self, client: int) -> Sequence[Any]:
        """The client's labelled held-out volumes (what validation scores)."""
        ...

    def place(self, device: torch.device | None) -> None:
        """Move the preprocessed volumes to ``device`` (``data.volumes_on``)."""
        ...


class FederationSettings(Protocol):
    """What the round engine's hooks read of the ``federation`` section
    (:class:`~fcl_lightning.federation.config.Federation` has it all; a Protocol here, so that
    this module needs nothing of the config's)."""

    rounds: int
    mode: Any  # federation.mode.Mode
    monitor: Any  # fcl.monitor.CollapseMonitor | None
    privacy: Any  # privacy.config.Privacy | None
    checkpoint_every: int
    checkpoint_keep: CheckpointKeep
    checkpoint_async: bool


@dataclass
class RunContext:
    """What a round hook sees of a run: its settings, module, data, folder and outputs, and one
    thing it may do (:meth:`log_metrics`); not the round engine. It changes the run only through
    what it adds to a round's ``metrics`` or the summary, and the files it writes."""

    fed: FederationSettings
    module: FederatedModule
    dm: FederatedData
    root: Path
    seed: int
    config_text: str
    loggers: list[Logger]
    console: Console  # round lines, tables: results (stdout)
    log_console: Console  # progress bar, notices (stderr)
    trainer_kwargs: dict[str, Any]
    #: whether the clients' states come back to this process (then saved under ``clients/``)
    states_come_back: bool = True

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log_metrics(metrics, step=step)
