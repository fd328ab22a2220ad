"""One client's work in one round, as a plain function of
``(global weights, client state, remote features) -> (update, client state, features to share)``,
so the in-process loop and a distributed runtime (Flower) drive the same code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch

from fcl_lightning.fcl.memory_bank import BankEntries
from fcl_lightning.lit.base import FederatedModule
from fcl_lightning.runtime import quiet_lightning, seed_all


@dataclass
class ClientRuntime:
    """What a client step runs with: the module instance, the data, a Trainer factory, settings."""

    module: FederatedModule
    datamodule: Any
    make_trainer: Callable[[], pl.Trainer]
    seed: int
    rounds: int
    exchange: bool = True
    exchange_per_partition: int | None = None
    exchange_source: str = "embed"
    keep_optimizer_state: bool = True


@dataclass
class ClientResult:
    update: dict[str, torch.Tensor]
    num_samples: int
    state: dict[str, Any]
    features: BankEntries | None
    metrics: dict[str, float] = field(default_factory=dict)


def client_seed(seed: int, round_idx: int, client: int) -> int:
    """Seed of one client's round: a pure function, so a resumed run repeats it exactly."""
    return (int(seed) * 1_000_003 + round_idx * 10_007 + client * 101 + 17) % (2**31)


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
    module.keep_optimizer_state = runtime.keep_optimizer_state
    module.round_progress = (round_idx, runtime.rounds)
    module.train()
    module.load_global_state(global_weights)
    module.load_client_state(state)
    module.receive_features(remote)
    loader = module.train_loader(runtime.datamodule, d, s)
    with quiet_lightning():
        trainer = runtime.make_trainer()
        trainer.fit(module, train_dataloaders=loader)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
        val = module.val_loader(runtime.datamodule, d)
        if val is not None:  # once per round, on the client's own validation patients
            for res in trainer.validate(module, dataloaders=val, verbose=False):
                metrics.update({k: float(v) for k, v in res.items()})
    features = None
    if runtime.exchange:
        g = torch.Generator().manual_seed(s + 1)
        module.to(trainer.strategy.root_device)  # Lightning moved it back to the CPU after fit
        features = module.export_features(
            runtime.datamodule, d, runtime.exchange_per_partition, g, source=runtime.exchange_source
        )
        module.cpu()
        if d != client:  # tag the vectors with the federation-wide client id
            features = BankEntries(features.vectors, features.partitions, torch.full_like(features.clients, client))
    return ClientResult(
        update={k: v.cpu() for k, v in module.global_state().items()},
        num_samples=module.num_samples(runtime.datamodule, d),
        state=module.client_state(),
        features=features,
        metrics=metrics,
    )
