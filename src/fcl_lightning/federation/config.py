"""The ``federation`` section of the config."""

from __future__ import annotations

import math
from typing import Literal

from jsonargparse import lazy_instance

from fcl_lightning.downstream import DownstreamEvaluation
from fcl_lightning.errors import ConfigError
from fcl_lightning.fcl.aggregate import Aggregator, FedAvg
from fcl_lightning.fcl.monitor import CollapseMonitor
from fcl_lightning.federation.checkpoint import CheckpointKeep
from fcl_lightning.federation.hooks import RoundHook
from fcl_lightning.federation.mode import Mode, mode_of
from fcl_lightning.privacy.config import Privacy


class Federation:
    """How clients train together.

    Args:
        rounds: communication rounds R.
        local_epochs: epochs E each selected client trains per round.
        local_steps: if set, each client trains exactly this many optimiser steps per round
            instead of ``local_epochs`` epochs (handy when a client has very few labelled slices).
        clients_per_round: clients sampled each round (``None``: all).
        mode: ``federated`` aggregates every round; ``local`` trains each client alone
            (no aggregation, no exchange: the per-client baselines and local fine-tuning); or a
            :class:`~fcl_lightning.federation.mode.Mode` plug-in by ``class_path``.
        aggregator: server-side merge plug-in (FedAvg weighted by training volumes by default).
        exchange: share momentum-encoder features between rounds (``False``: the
            "FedAvg + partition loss" ablation).
        exchange_per_partition: vectors each client shares per partition (``None``: all its slices).
        exchange_source: ``embed``: after the round, embed the client's slices with its momentum
            encoder (the paper; costs one forward pass over every slice); ``keys``: share the
            momentum-encoder keys the round already computed (augmented views, one slice per
            partition and volume per epoch; no extra compute, for weak devices).
        keep_optimizer_state: keep each client's optimiser state across rounds.
        downstream: opt-in downstream evaluation after pre-training (and every k rounds): brief
            fine-tuning from the global encoder and from random init; logs ``downstream/*``.
        checkpoint_every: write the run's checkpoint (the clients' states, then ``round-NNN.ckpt``
            linked as ``last.ckpt``) every this many rounds and after the last; a run stopped in
            between resumes from the last one and trains the rounds after it again, bitwise.
            Larger: fewer bytes written (what competes with training), more rounds redone.
        checkpoint_keep: which round files stay: the newest ``last`` whole (resumable), older ones
            every ``every`` rounds as global weights only (default: the newest 2, and every 10th).
        checkpoint_async: write each round's checkpoint on a background thread while the next
            round trains (its contents are copied first; ``False``: write before going on).
        min_clients: a round in which fewer clients reply fails (Flower: failed or timed-out
            clients are left out of the round's aggregate; in-process every client replies).
        round_timeout: seconds the Flower server waits for a round's replies (``None``: no limit).
        monitor: collapse and learning monitors of the global encoder after each round
            (``round/monitor/*``: embedding spread, k-NN partition probe on held-out patients);
            pre-training modules only; ``null`` turns them off.
        select_best: local fine-tuning: keep each client's weights from the round with its best
            validation Dice (``val/dice_mean``, on the client's validation patients), which is
            what ``test`` then scores (the paper selects its checkpoint so). Scoring the same
            patients the selection looked at is optimistic: hold out others for the figures.
        hooks: extra round hooks (``RoundHook`` subclasses, by ``class_path``), run after the
            built-in ones that measure a round and before the checkpoint and the report.
        reuse_trainers: build each client's Trainer once and extend its budget every round
            (``False``: a new Trainer per client per round; same results, slower).
        privacy: opt-in differential privacy of what each client sends (the exchanged vectors,
            the weight updates), with the privacy loss over the run (README, "What leaves a hospital").
            The accountant composes what every round released, resumes included; with a target
            epsilon a resumed run's remaining rounds are noised so that the whole run meets it.
        privacy_change: a resume whose ``privacy`` differs from the checkpoint's run (another
            target, noise, clip, or privacy off) is refused (``refuse``); ``continue`` goes on
            under the new settings, and the epsilon reported composes both parts (``inf`` once
            anything left a client without noise).
    """

    def __init__(
        self,
        rounds: int = 10,
        local_epochs: int = 1,
        local_steps: int | None = None,
        clients_per_round: int | None = None,
        mode: Literal["federated", "local"] | Mode = "federated",
        aggregator: Aggregator = lazy_instance(FedAvg),
        exchange: bool = True,
        exchange_per_partition: int | None = None,
        exchange_source: Literal["embed", "keys"] = "embed",
        keep_optimizer_state: bool = True,
        checkpoint_every: int = 1,
        checkpoint_keep: CheckpointKeep | None = None,
        checkpoint_async: bool = True,
        downstream: DownstreamEvaluation | None = None,
        min_clients: int = 1,
        round_timeout: float | None = None,
        monitor: CollapseMonitor | None = lazy_instance(CollapseMonitor),
        select_best: bool = False,
        hooks: list[RoundHook] | None = None,
        reuse_trainers: bool = True,
        privacy: Privacy | None = None,
        privacy_change: Literal["refuse", "continue"] = "refuse",
    ) -> None:
        if rounds < 1 or local_epochs < 1:
            raise ValueError(f"rounds and local_epochs must be >= 1 (got {rounds}, {local_epochs})")
        if clients_per_round is not None and clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if local_steps is not None and local_steps < 1:
            raise ValueError(f"federation.local_steps must be >= 1 or null (local_epochs then), got {local_steps}")
        if exchange_per_partition is not None and exchange_per_partition < 1:
            raise ValueError(
                f"federation.exchange_per_partition must be >= 1 or null (all), got {exchange_per_partition}"
            )
        if round_timeout is not None and not (round_timeout > 0 and math.isfinite(round_timeout)):
            raise ValueError(f"federation.round_timeout must be > 0 seconds or null (no limit), got {round_timeout}")
        if clients_per_round is not None and min_clients > clients_per_round:
            raise ValueError(
                f"federation.min_clients={min_clients} is above federation.clients_per_round={clients_per_round}: "
                "every round would fail"
            )
        self.rounds, self.local_epochs, self.clients_per_round = rounds, local_epochs, clients_per_round
        self.mode: Mode = mode_of(mode)
        self.aggregator, self.exchange = aggregator, exchange
        self.exchange_per_partition, self.keep_optimizer_state = exchange_per_partition, keep_optimizer_state
        self.exchange_source = exchange_source
        self.checkpoint_every, self.checkpoint_async = checkpoint_every, checkpoint_async
        self.checkpoint_keep = checkpoint_keep if checkpoint_keep is not None else CheckpointKeep()
        self.local_steps = local_steps
        self.downstream = downstream
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        self.min_clients, self.round_timeout = min_clients, round_timeout
        self.monitor = monitor
        self.select_best = select_best
        self.hooks = list(hooks or [])
        self.reuse_trainers = reuse_trainers
        if privacy is not None:
            if privacy.features and not exchange:
                raise ConfigError(
                    "federation.privacy.features noises the exchanged vectors, but federation.exchange is false: "
                    "set privacy.features false (weights only) or turn the exchange on"
                )
            privacy.calibrate(rounds)
        self.privacy = privacy
        if privacy_change not in ("refuse", "continue"):
            raise ValueError(f"federation.privacy_change must be 'refuse' or 'continue', got {privacy_change!r}")
        self.privacy_change = privacy_change
