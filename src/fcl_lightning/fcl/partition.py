"""Partitions along the slice axis (FCL step 1): slice ``z`` of ``D`` belongs to ``floor(z*S/D)``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


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


def volume_slices(volumes: Sequence[torch.Tensor], num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slice of the ``[1, H, W, D]`` volumes as one batch ``[N, 1, H, W]``, with each slice's
    partition ``[N]`` (long, on the CPU): what the exchange, the monitors and the embedding figure embed."""
    x = torch.cat([v.permute(3, 0, 1, 2) for v in volumes])
    parts = torch.cat(
        [torch.as_tensor(partition_of(np.arange(v.shape[-1]), v.shape[-1], num_partitions)) for v in volumes]
    )
    return x, parts.long()
