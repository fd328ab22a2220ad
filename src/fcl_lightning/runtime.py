"""What every stage runs under, free of the federation: seeding, quiet Lightning Trainers, and
Trainers that leave the module on its device between fits."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.strategies import SingleDeviceStrategy

#: Lightning's notices that a federation of many small Trainers makes noise, not news
_QUIET = (
    ".*does not have many workers.*",
    ".*but have no `val_dataloader`.*",
    ".*number of training batches.*",
    ".*LeafSpec.*",
    ".*litlogger.*",
)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Per-client Trainers run silently: the federation prints progress once for all of them."""
    lg = logging.getLogger("lightning.pytorch")
    prev = lg.level
    lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for msg in _QUIET:
            warnings.filterwarnings("ignore", message=msg)
        try:
            yield
        finally:
            lg.setLevel(prev)


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (``lightning.seed_everything``, without its log line)."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed {seed} is outside 0 .. 2**32 - 1")
    seed_everything(seed, verbose=False)


class ResidentStrategy(SingleDeviceStrategy):
    """Lightning's single-device strategy, except that the end of a ``fit``/``validate``/``test``
    leaves the module and its optimiser on the device (Lightning's ``Strategy.teardown`` moves
    both to the CPU and, on CUDA, empties the cache). A federation runs one fit per client per
    round on one module instance, so that teardown was a device -> CPU -> device round trip of
    every weight and optimiser moment per client per round."""

    def model_to_device(self) -> None:
        # the module is there already from the previous fit (a walk over every tensor otherwise)
        if getattr(self.model, "device", None) != self.root_device:
            super().model_to_device()

    def teardown(self) -> None:
        self.precision_plugin.teardown()
        self.checkpoint_io.teardown()


#: the ``trainer`` settings that decide where a Trainer trains
_PLACEMENT = ("accelerator", "devices", "num_nodes", "strategy")
#: the ``trainer`` settings of how a Trainer computes (what a side Trainer, e.g. a downstream
#: fine-tuning, takes over from the template: its placement, precision and determinism)
DEVICE_KEYS = (*_PLACEMENT, "precision", "deterministic", "benchmark")
#: the ``trainer`` settings the project's own Trainers never take from the template: the caller
#: sets the budget, and the federation owns checkpoints, progress and the model summary
CALLER_OWNS = (
    "max_epochs",
    "min_epochs",
    "max_steps",
    "enable_checkpointing",
    "enable_progress_bar",
    "enable_model_summary",
)
_RESOLVED: dict[str, torch.device | None] = {}


def resident_device(trainer_kwargs: dict[str, Any]) -> torch.device | None:
    """The device Trainers with these settings train on, when Lightning resolves them to one
    device with its default strategy (``None`` otherwise: a multi-device or user-chosen strategy
    keeps Lightning's teardown). Lightning's own resolution decides, on a throwaway Trainer."""
    kw = {k: v for k, v in trainer_kwargs.items() if k in _PLACEMENT}
    if kw.get("strategy", "auto") != "auto":
        return None
    key = repr(sorted(kw.items()))
    if key not in _RESOLVED:  # once per process and settings (every fine-tuning asks again)
        with quiet_lightning():
            probe = pl.Trainer(**kw, logger=False, enable_checkpointing=False, enable_progress_bar=False)
        _RESOLVED[key] = probe.strategy.root_device if type(probe.strategy) is SingleDeviceStrategy else None
    return _RESOLVED[key]


def resident_trainer(device: torch.device | None, **trainer_kwargs: Any) -> pl.Trainer:
    """``pl.Trainer(**trainer_kwargs)`` that keeps the module on ``device`` between fits
    (:class:`ResidentStrategy`; ``device=None``: Lightning's default strategy)."""
    if device is not None:
        trainer_kwargs = {**trainer_kwargs, "strategy": ResidentStrategy(device=device)}
    return pl.Trainer(**trainer_kwargs)


def quiet_trainer(
    template: dict[str, Any],
    *,
    max_steps: int = -1,
    max_epochs: int | None = None,
    callbacks: list[pl.Callback] | None = None,
    default_root_dir: str | None = None,
) -> pl.Trainer:
    """A Trainer from the ``trainer`` settings ``template`` that logs, checkpoints, shows and
    summarises nothing (the caller reports), with the budget given here (the template's is
    ignored: :data:`CALLER_OWNS`), keeping the module on its device between fits
    (:func:`resident_device`). The one builder of the federation's client Trainers and of the
    downstream fine-tuning's."""
    kw = {k: v for k, v in template.items() if k not in ("logger", "default_root_dir", "callbacks", *CALLER_OWNS)}
    return resident_trainer(
        resident_device(kw),
        **kw,
        max_steps=max_steps,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks or []),
        default_root_dir=default_root_dir,
    )
