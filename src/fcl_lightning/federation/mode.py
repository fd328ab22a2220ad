"""``federation.mode``: the plug-in that decides what a round's client updates become. It owns
where each client starts a round, the merge, what the run exports and which weights the module
holds at the end; the round engine and the hooks ask it instead of comparing names.

``federated`` (:class:`Federated`): every client starts from the global weights and the server
merges the updates with the aggregator plug-in (FedAvg); clients may exchange features.
``local`` (:class:`Local`): each client trains alone from its own weights (the per-client
baselines and local fine-tuning); nothing is merged or exchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fcl_lightning import layout
from fcl_lightning.errors import ConfigError
from fcl_lightning.io import atomic_save

if TYPE_CHECKING:
    from fcl_lightning.federation.client import ClientResult
    from fcl_lightning.federation.state import RunState


class Mode:
    """Base of the modes. ``global_model``: one model is trained for all clients (its weights
    travel to and from the server, features may be exchanged, the monitors and the downstream
    evaluation measure it, Flower can run it)."""

    name: str = ""
    global_model: bool = False

    def __str__(self) -> str:
        return self.name

    def check(self, fed: Any, module: Any) -> None:
        """Config checks that need no data (``fed``: the ``federation`` section)."""

    def start_weights(self, client: int, state: RunState, module: Any) -> dict[str, torch.Tensor]:
        """What ``client`` trains from this round."""
        raise NotImplementedError

    def aggregate(self, fed: Any, state: RunState, results: dict[int, ClientResult]) -> None:
        """Turn the round's updates into the run's weights (in ``state``)."""
        raise NotImplementedError

    def final_weights(self, state: RunState, module: Any) -> None:
        """Leave the run's result in ``module`` after the last round."""

    def export(self, root: Path, state: RunState, module: Any, fed: Any, datamodule: Any) -> None:
        """Write the stage's encoder(s) (``encoder.pt``; pre-training only)."""
        raise NotImplementedError


class Federated(Mode):
    """Every client starts from the global weights; the aggregator merges the updates."""

    name, global_model = "federated", True

    def check(self, fed, module) -> None:
        privacy = getattr(fed, "privacy", None)
        if privacy is not None and privacy.features and not module.shares_features:
            raise ConfigError(
                f"federation.privacy.features noises the exchanged vectors, but {type(module).__name__} with "
                f"{type(getattr(module, 'objective', module)).__name__} exchanges none: set privacy.features false"
            )
        if module.per_client_init:
            raise ConfigError(
                "a per-client pretrained path ('{client}' in model.pretrained) needs "
                "federation.mode local; federated fine-tuning starts every client from one model"
            )

    def start_weights(self, client, state, module):
        return state.global_w

    def aggregate(self, fed, state, results) -> None:
        state.global_w = fed.aggregator([r.update for r in results.values()], [r.num_samples for r in results.values()])

    def final_weights(self, state, module) -> None:
        module.load_global_state(state.global_w)

    def export(self, root, state, module, fed, datamodule) -> None:
        encoder = module.encoder_state()
        if encoder is not None:
            atomic_save(encoder, root / layout.ENCODER)


class Local(Mode):
    """Each client trains alone from its own weights (its first round: the module's per-client
    start, e.g. a per-client pre-trained encoder); ``select_best`` keeps each client's weights
    from its best validation round."""

    name = "local"

    def check(self, fed, module) -> None:
        if getattr(fed, "privacy", None) is not None:
            raise ConfigError(
                "federation.privacy bounds what clients send, and in federation.mode local nothing leaves a client: "
                "remove federation.privacy"
            )

    def start_weights(self, client, state, module):
        if client in state.client_w:
            return state.client_w[client]
        return module.client_initial_weights(client, state.global_w)

    def aggregate(self, fed, state, results) -> None:
        state.client_w.update({c: r.update for c, r in results.items()})
        if fed.select_best:
            for c, r in results.items():
                d = r.metrics.get("val/dice_mean")
                if d is not None and (c not in state.best or d > state.best[c][0]):
                    state.best[c] = (float(d), r.update)

    def export(self, root, state, module, fed, datamodule) -> None:
        # local pre-training (e.g. Local CL): one encoder per client, and their FedAvg as
        # encoder.pt, the common start of federated fine-tuning
        if module.encoder_state() is None or not state.client_w:
            return
        clients = sorted(state.client_w)
        for c in clients:
            module.load_global_state(state.client_w[c])
            atomic_save(module.encoder_state(), layout.client_encoder(root, c))
        merged = fed.aggregator(
            [state.client_w[c] for c in clients], [module.num_samples(datamodule, c) for c in clients]
        )
        module.load_global_state(merged)
        atomic_save(module.encoder_state(), root / layout.ENCODER)


MODES: dict[str, type[Mode]] = {"federated": Federated, "local": Local}


def mode_of(mode: str | Mode) -> Mode:
    """A mode by name (the config's ``federated`` / ``local``) or as given (a plug-in instance)."""
    if isinstance(mode, Mode):
        return mode
    if mode not in MODES:
        raise ValueError(f"federation.mode must be one of {sorted(MODES)} or a Mode plug-in, got {mode!r}")
    return MODES[mode]()
