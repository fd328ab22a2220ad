"""What every stage runs under, free of the federation: seeding and quiet Lightning Trainers."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch import seed_everything

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
