"""One client's work in one round, as a plain function of
``(global weights, client state, remote features) -> (update, client state, features to share)``,
so the in-process loop and a distributed runtime (Flower) drive the same code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch

from fcl_lightning import compat
from fcl_lightning.fcl.memory_bank import BankEntries
from fcl_lightning.federation.contract import ClientModule, RoundContext
from fcl_lightning.privacy.client import ClientPrivacy
from fcl_lightning.privacy.config import Privacy
from fcl_lightning.runtime import quiet_lightning, seed_all


class ClientTrainers:
    """Each client's Trainer, built for its first round and reused in every later one: a round
    restarts its epoch count (``local_epochs`` as built) or extends its ``max_steps`` by
    ``local_steps``, instead of paying for a new Trainer per client per round. ``reuse=False``: a fresh Trainer every round
    (the equivalence tests hold the two to the same bits).

    Lightning counts a reused Trainer's optimiser steps from its first fit on;
    :class:`~fcl_lightning.lit.base.FederatedModule` counts them from the start of each fit
    (``step_in_fit``, what the momentum schedule uses). Epochs restart at 0 every round.
    """

    def __init__(self, build: Callable[[], pl.Trainer], local_steps: int | None, reuse: bool = True) -> None:
        self.build, self.local_steps, self.reuse = build, local_steps, reuse
        self._by_client: dict[int, pl.Trainer] = {}

    def get(self, client: int) -> pl.Trainer:
        """``client``'s Trainer with the budget of one more round."""
        trainer = self._by_client.get(client)
        if trainer is None:
            trainer = self.build()
            if self.reuse:
                self._by_client[client] = trainer
            return trainer
        # every round starts at epoch 0 as on a new Trainer (past epoch 0 Lightning makes the
        # loader's iterator twice, one more draw from the seeded RNG); the step count runs on
        compat.restart_epochs(trainer)
        if self.local_steps is not None:
            compat.extend_max_steps(trainer, self.local_steps)
        trainer.should_stop = False  # an early-stopping callback ends a round, not the client
        return trainer

    def discard(self, client: int) -> None:
        """Forget ``client``'s Trainer (its fit failed: the next round builds a new one)."""
        self._by_client.pop(client, None)


@dataclass
class ClientRuntime:
    """What a client step runs with: the module instance, the data, the clients' Trainers, settings."""

    module: ClientModule
    datamodule: Any
    trainers: ClientTrainers
    seed: int
    rounds: int
    exchange: bool = True
    exchange_per_partition: int | None = None
    exchange_source: str = "embed"
    keep_optimizer_state: bool = True
    #: ``federation.privacy`` (``None``: off)
    privacy: Privacy | None = None


@dataclass
class ClientResult:
    update: dict[str, torch.Tensor]
    num_samples: int
    #: the client's state after the round (``None``: the client saved it where it trained)
    state: dict[str, Any] | None
    features: BankEntries | None
    metrics: dict[str, float] = field(default_factory=dict)


def client_seed(seed: int, round_idx: int, client: int) -> int:
    """Seed of one client's round: a pure function, so a resumed run repeats it exactly."""
    return (int(seed) * 1_000_003 + round_idx * 10_007 + client * 101 + 17) % (2**31)


def fit_round(runtime: ClientRuntime, client: int, loader: Any, d: int) -> tuple[Any, dict[str, float]]:
    """The round's local training on ``client``'s reused Trainer, then one validation pass on the
    client's own validation patients; the Trainer and the round's figures."""
    module = runtime.module
    with quiet_lightning():
        trainer = runtime.trainers.get(client)
        try:
            trainer.fit(module, train_dataloaders=loader)
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
            metrics.update(module.fit_means)  # the round's means, not its last epoch's
            val = module.val_loader(runtime.datamodule, d)
            if val is not None:  # once per round
                for res in trainer.validate(module, dataloaders=val, verbose=False):
                    metrics.update({k: float(v) for k, v in res.items()})
        except BaseException:
            runtime.trainers.discard(client)  # a Trainer stopped mid-fit is not reused
            raise
    return trainer, metrics


def client_step(
    global_weights: dict[str, torch.Tensor],
    state: dict[str, Any] | None,
    remote: BankEntries | None,
    *,
    client: int,
    round_idx: int,
    runtime: ClientRuntime,
    data_client: int | None = None,
) -> ClientResult:
    """Train ``client`` for one round starting from ``global_weights`` and its own ``state``.

    ``data_client`` is the datamodule's index of this client's data when it differs from the
    federation-wide id ``client`` (a Flower node whose datamodule holds only its own site).
    """
    d = client if data_client is None else data_client
    s = client_seed(runtime.seed, round_idx, client)
    seed_all(s)
    module = runtime.module
    module.begin_round(RoundContext(round_idx, runtime.rounds, runtime.keep_optimizer_state))
    module.train()
    module.load_global_state(global_weights)
    module.load_client_state(state)
    module.receive_features(remote)
    privacy = ClientPrivacy(runtime.privacy, state, round_idx)
    features = None
    if runtime.exchange:  # DP vectors come from the round's global model, before training
        features = privacy.features(module, runtime.datamodule, d, runtime.exchange_per_partition, s + 1)
    trainer, metrics = fit_round(runtime, client, module.train_loader(runtime.datamodule, d, s), d)
    if runtime.exchange and features is None:
        g = torch.Generator().manual_seed(s + 1)
        if module.device != trainer.strategy.root_device:  # Lightning's own strategies move it off
            module.to(trainer.strategy.root_device)
        features = module.export_features(
            runtime.datamodule, d, runtime.exchange_per_partition, g, source=runtime.exchange_source
        )
    if features is not None and d != client:  # tag the vectors with the federation-wide client id
        features = BankEntries(features.vectors, features.partitions, torch.full_like(features.clients, client))
    update = privacy.update({k: v.cpu() for k, v in module.global_state().items()}, global_weights)
    client_state = privacy.keep(module.client_state())
    return ClientResult(
        update=update,
        num_samples=module.num_samples(runtime.datamodule, d),
        state=client_state,
        features=features,
        metrics=metrics,
    )
