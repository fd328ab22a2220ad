"""What the federated loop needs from a LightningModule: which weights are global (averaged),
which state is the client's own, and which loader to train on."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from fcl_lightning.errors import ConfigError
from fcl_lightning.fcl.memory_bank import BankEntries

if TYPE_CHECKING:
    from fcl_lightning.federation.contract import RoundContext


def check_optimizer(optimizer: Any, scheduler: Any = None) -> None:
    """Build the optimiser (and scheduler) once on a dummy parameter, so that a bad argument
    (``lr -0.1``) is one config error at start-up rather than a failure after the data loaded."""
    dummy = torch.nn.Parameter(torch.zeros(1))
    try:
        opt = optimizer([dummy])
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model.optimizer: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if scheduler is not None:
        try:
            scheduler(opt)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"model.scheduler: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None


def state_mismatch(own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], configured: str) -> str | None:
    """Why the state dict ``given`` cannot be loaded where ``own`` is (the counts, and the first
    key missing, unexpected and of another shape; ``configured`` names ``own``), or ``None``."""
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    shapes = sorted(k for k in own if k in given and tuple(own[k].shape) != tuple(given[k].shape))
    if not (missing or unexpected or shapes):
        return None
    parts = [
        f"{len(missing)} missing (first: {missing[0]})" if missing else "",
        f"{len(unexpected)} unexpected (first: {unexpected[0]})" if unexpected else "",
        f"{len(shapes)} of another shape (first: {shapes[0]}: {tuple(given[shapes[0]].shape)} there, "
        f"{tuple(own[shapes[0]].shape)} in {configured})"
        if shapes
        else "",
    ]
    return ", ".join(p for p in parts if p)


class FederatedModule(pl.LightningModule):
    """Base of the project's LightningModules.

    ``global_prefixes`` names the state-dict entries the server aggregates; every other entry
    (momentum encoder, memory banks, ...) is per-client state kept across rounds, together with
    the optimiser state when the loop asks for it.
    """

    global_prefixes: tuple[str, ...] = ()
    #: whether ``export_features`` shares vectors between rounds (FCL's feature exchange)
    shares_features: bool = False
    #: state-dict prefixes that are neither global nor client state (re-sent by the server each round)
    transient_prefixes: tuple[str, ...] = ()
    #: what this stage is: ``pretrain`` exports an encoder (``encoder_state``), ``finetune`` is
    #: scored as a segmentation model (``scored_net``); also its key in ``summary.json``
    stage: str = "finetune"

    def __init__(self) -> None:
        super().__init__()
        self._optimizer_state: dict | None = None
        self._handed_over = False  # whether a caller holds this module's client tensors
        self.keep_optimizer_state = True
        self.round_progress: tuple[int, int] = (0, 1)  # (round, total rounds), set by the loop
        self._fit_start_step = 0  # the Trainer's global step when this fit started
        self._last_seen_step = -1
        #: each ``train/*`` mean over the last fit (a client's round): see ``on_train_epoch_end``
        self.fit_means: dict[str, float] = {}

    def begin_round(self, context: RoundContext) -> None:
        """The round this client is about to train (``federation.contract.RoundTraining``):
        what the momentum and ramp schedules count over, and whether the optimiser state carries."""
        self.round_progress = (context.round, context.rounds)
        self.keep_optimizer_state = context.keep_optimizer_state

    # ------------------------------------------------------------- this fit
    # A client's Trainer lives across rounds (federation.reuse_trainers) and Lightning's step
    # count runs on from round to round: these count from the start of this fit.
    def on_fit_start(self) -> None:
        self._fit_start_step = self._epoch_start_step = self.trainer.global_step
        self._last_seen_step = self.trainer.global_step  # what stepped_since_last_call compares with
        self.fit_means: dict[str, float] = {}
        self._fit_steps: dict[str, int] = {}

    def on_train_epoch_end(self) -> None:
        """``fit_means``: each ``train/*`` epoch mean averaged over this fit's epochs, weighted by
        their optimiser steps, i.e. the mean over the client's round (a metric logged on some
        steps only, weighted by its epochs' steps all the same); with ``local_steps`` past one
        epoch, ``callback_metrics`` holds the last (cut short) epoch's mean alone."""
        n = self.trainer.global_step - self._epoch_start_step
        self._epoch_start_step = self.trainer.global_step
        for k, v in self.trainer.callback_metrics.items():
            if n > 0 and k.startswith("train/") and torch.as_tensor(v).numel() == 1:
                seen = self._fit_steps.get(k, 0)
                self.fit_means[k] = (self.fit_means.get(k, 0.0) * seen + float(v) * n) / (seen + n)
                self._fit_steps[k] = seen + n

    def stepped_since_last_call(self) -> bool:
        """Whether the optimiser has stepped since this was last asked (in ``on_train_batch_end``:
        whether this batch ended with a step). With ``accumulate_grad_batches`` k a step ends only
        every k-th batch; EMA updates (momentum encoder, mean teacher) follow steps, not batches."""
        step = self.trainer.global_step
        stepped = step != self._last_seen_step
        self._last_seen_step = step
        return stepped

    @property
    def step_in_fit(self) -> int:
        """Optimiser steps taken in this fit (this client's round)."""
        return self.trainer.global_step - self._fit_start_step if self._trainer is not None else 0

    @property
    def steps_of_fit(self) -> float:
        """Optimiser steps this fit takes in all: ``Trainer.estimated_stepping_batches`` counted
        from the fit's start (``inf`` for an unbounded fit)."""
        t = self.trainer
        if t.max_epochs is None or t.max_epochs == -1:
            steps = math.inf
        else:
            steps = math.ceil(t.num_training_batches / t.accumulate_grad_batches) * max(t.max_epochs, 1)
        return steps if t.max_steps == -1 else min(steps, t.max_steps - self._fit_start_step)

    # ------------------------------------------------------------- weights
    def _is_global(self, key: str) -> bool:
        return key.startswith(self.global_prefixes)

    def global_state(self) -> dict[str, torch.Tensor]:
        """Copies of the weights the server aggregates."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if self._is_global(k)}

    def global_state_mismatch(self, state: dict[str, torch.Tensor]) -> str | None:
        """Why ``state`` cannot be this module's global weights, or ``None`` if it fits."""
        own = {k: v for k, v in self.state_dict(keep_vars=True).items() if self._is_global(k)}
        problem = state_mismatch(own, state, f"the configured {type(self).__name__}")
        return None if problem is None else "weights " + problem

    def load_global_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load aggregated weights; keys and shapes must match exactly."""
        problem = self.global_state_mismatch(state)
        if problem:
            raise KeyError(f"global weights do not match {type(self).__name__}: {problem}")
        self.load_state_dict(state, strict=False)

    def encoder_state(self) -> dict[str, torch.Tensor] | None:
        """The weights a pre-training stage exports for fine-tuning (``encoder.pt``); ``None``
        for a stage that exports none."""
        return None

    def scored_net(self) -> torch.nn.Module | None:
        """The segmentation network ``test`` scores; ``None`` for a stage that is not scored so."""
        return None

    @property
    def input_multiple(self) -> int:
        """Image sides must be a multiple of this (the encoder halves them at every level)."""
        return 1

    @property
    def min_input_size(self) -> int:
        """The smallest image side: instance norm needs more than one value per channel, so its
        bottleneck must be at least 2 x 2."""
        norm = self.hparams.get("norm", "instance") if hasattr(self, "hparams") else "instance"
        return self.input_multiple * (2 if norm == "instance" and self.input_multiple > 1 else 1)

    def _client_keys(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in sd.items() if not self._is_global(k) and not k.startswith(self.transient_prefixes)}

    def client_state(self) -> dict[str, Any]:
        """What this client keeps across rounds: the module's own tensors, handed over without a
        copy (the next client gets other storage: :meth:`load_client_state`)."""
        out: dict[str, Any] = {"modules": {k: v.detach() for k, v in self._client_keys(self.state_dict()).items()}}
        self._handed_over = True
        if self.keep_optimizer_state and self._optimizer_state is not None:
            out["optimizer"] = self._optimizer_state  # owned by the caller from here on
        return out

    def load_client_state(self, state: dict[str, Any] | None) -> None:
        """Restore a client's state, or initialise a fresh client (``None``) from the global weights.

        A client's tensors become the module's own (``load_state_dict(assign=True)``: a swap of
        references on the module's device, not a copy); a fresh client first gets copies of the ones the module
        holds, so that the client that handed them over keeps its own."""
        self._optimizer_state = None
        if state is None:
            if self._handed_over:
                own = {k: v.detach().clone() for k, v in self._client_keys(self.state_dict()).items()}
                self.load_state_dict(own, strict=False, assign=True)
                self._handed_over = False
            self.init_client_state()
            return
        device = self.device
        modules = {k: v.to(device) for k, v in state["modules"].items()}  # .to: a no-op there
        self.load_state_dict(modules, strict=False, assign=True)
        self._handed_over = True  # the caller still holds these tensors
        self._optimizer_state = state.get("optimizer")  # Optimizer.load_state_dict copies it

    def init_client_state(self) -> None:
        """Fresh per-client state, derived from the current (global) weights."""

    #: whether clients start from different weights (``client_initial_weights``); local mode only
    per_client_init: bool = False

    def client_initial_weights(self, client: int, global_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights ``client`` starts from before its first round in local mode (default: the
        global ones; the segmentation module loads a per-client pre-trained encoder here)."""
        return global_weights

    # ------------------------------------------------------------ training
    def train_loader(self, datamodule: Any, client: int, seed: int) -> DataLoader:
        """The loader this module trains on for ``client``."""
        raise NotImplementedError

    def val_loader(self, datamodule: Any, client: int) -> DataLoader | None:
        """The loader this module validates on for ``client`` (``None``: no validation)."""
        return None

    def check_data(self, datamodule: Any, client_steps: int | None, console: Any) -> None:
        """Before anything is written: check that every client's data suits this module (raise
        a ``DataError`` naming the client) and print what each client will train on.
        ``client_steps``: the optimiser steps a client takes over the run, when known."""

    def num_samples(self, datamodule: Any, client: int) -> int:
        """The client's weight in FedAvg: its number of training volumes."""
        return datamodule.num_train_samples(client)

    def receive_features(self, entries: BankEntries | None) -> None:
        """Take the vectors other clients shared (only modules that exchange features)."""

    def export_features(
        self, datamodule: Any, client: int, per_partition: int | None, generator: torch.Generator, source: str = "embed"
    ) -> BankEntries | None:
        """Vectors this client shares after a round (``None``: this module shares nothing)."""
        return None

    #: on-device augmentation of training batches (``data.augment_on: device``), set with the loader
    batch_augment: Any = None

    @staticmethod
    def augment_of(datamodule: Any, stage: str) -> Any:
        """The datamodule's on-device augmentation for ``stage`` (``None``: none, or a datamodule
        without it)."""
        return datamodule.batch_augment(stage) if hasattr(datamodule, "batch_augment") else None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment a training batch on its device when the loader left it to us (``aug_seed``)."""
        aug = self.batch_augment
        if aug is None or not isinstance(batch, dict) or "aug_seed" not in batch:
            return batch
        batch = dict(batch)
        batch["image"], label = aug(batch["image"], batch.pop("aug_seed"), batch.get("label"))
        if label is not None:
            batch["label"] = label
        if "aug_seed_k" in batch:
            batch["image_k"], _ = aug(batch["image_k"], batch.pop("aug_seed_k"))
        return batch

    def on_train_start(self) -> None:
        if self._optimizer_state is not None:
            self.trainer.optimizers[0].load_state_dict(self._optimizer_state)

    def on_train_end(self) -> None:
        if self.keep_optimizer_state and self.trainer.optimizers:
            # every fit makes a new optimiser (configure_optimizers): no copy needed
            self._optimizer_state = self.trainer.optimizers[0].state_dict()
