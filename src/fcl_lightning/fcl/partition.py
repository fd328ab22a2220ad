"""Partitions along the slice axis (FCL step 1): slice ``z`` of ``D`` belongs to ``floor(z*S/D)``."""

from __future__ import annotations

import numpy as np


def partition_of(z: int | np.ndarray, num_slices: int, num_partitions: int) -> int | np.ndarray:
    """Partition index of slice ``z`` in a volume of ``num_slices`` slices split into ``num_partitions``."""
    return (
        (np.asarray(z) * num_partitions) // num_slices
        if isinstance(z, np.ndarray)
        else (z * num_partitions) // num_slices
    )


def partition_slices(num_slices: int, num_partitions: int) -> list[np.ndarray]:
    """Slice indices of each partition, in order. Every partition is non-empty iff ``D >= S``."""
    if num_slices < num_partitions:
        raise ValueError(f"a volume with {num_slices} slices cannot be split into {num_partitions} partitions")
    parts = partition_of(np.arange(num_slices), num_slices, num_partitions)
    return [np.flatnonzero(parts == p) for p in range(num_partitions)]


def sample_partition_slices(num_slices: int, num_partitions: int, rng: np.random.Generator) -> np.ndarray:
    """One random slice from every partition, in partition order (a pre-training batch's per-volume draw)."""
    return np.array([rng.choice(s) for s in partition_slices(num_slices, num_partitions)], dtype=np.int64)
