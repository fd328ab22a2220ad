"""What the round engine (the in-process loop, a Flower node, the simulation) may ask of a stage's
module: four small typed protocols, and the round's context passed in rather than set on it.

:class:`~fcl_lightning.lit.base.FederatedModule` implements them all; a new stage is any
LightningModule that does. The engine never reaches past them into a module's internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader

from fcl_lightning.fcl.memory_bank import BankEntries


@dataclass(frozen=True)
class RoundContext:
    """What a client's round is: its index (from 0), the run's rounds, and whether its optimiser
    state carries over from its previous round."""

    round: int
    rounds: int
    keep_optimizer_state: bool = True


@runtime_checkable
class SharedWeights(Protocol):
    """The weights a client sends and the server aggregates (``global_prefixes``)."""

    def global_state(self) -> dict[str, torch.Tensor]: ...
    def global_state_mismatch(self, state: dict[str, torch.Tensor]) -> str | None: ...
    def load_global_state(self, state: dict[str, torch.Tensor]) -> None: ...
    def num_samples(self, datamodule: Any, client: int) -> int: ...


@runtime_checkable
class ClientState(Protocol):
    """What a client keeps across rounds and never sends (momentum nets, banks, a teacher)."""

    def client_state(self) -> dict[str, Any]: ...
    def load_client_state(self, state: dict[str, Any] | None) -> None: ...


@runtime_checkable
class FeatureExchange(Protocol):
    """The vectors a client shares after a round and the ones it receives (FCL's exchange)."""

    shares_features: bool

    def receive_features(self, entries: BankEntries | None) -> None: ...
    def export_features(
        self, datamodule: Any, client: int, per_partition: int | None, generator: torch.Generator, source: str = ...
    ) -> BankEntries | None: ...


@runtime_checkable
class RoundTraining(Protocol):
    """One round of local training: its context, its loaders, and the round's means."""

    fit_means: dict[str, float]

    def begin_round(self, context: RoundContext) -> None: ...
    def train_loader(self, datamodule: Any, client: int, seed: int) -> DataLoader: ...
    def val_loader(self, datamodule: Any, client: int) -> DataLoader | None: ...


@runtime_checkable
class ClientModule(SharedWeights, ClientState, FeatureExchange, RoundTraining, Protocol):
    """Everything a client step asks of its module."""
