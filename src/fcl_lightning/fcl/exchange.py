"""Feature exchange between rounds: clients share momentum-encoder vectors tagged with their
partition index and their own client id (never pixels, never gradients); each client's remote
bank is replaced by what the *other* clients sent."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from fcl_lightning.fcl.aggregate import tensor_nbytes
from fcl_lightning.fcl.memory_bank import BankEntries
from fcl_lightning.fcl.partition import volume_slices


@torch.no_grad()
def embed_slices(
    embed: Callable[[torch.Tensor], torch.Tensor],
    volumes: Iterable[torch.Tensor],
    num_partitions: int,
    client: int,
    per_partition: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> BankEntries:
    """Embed a client's slices for sharing.

    Args:
        embed: maps ``[N, 1, H, W]`` slices to L2-normalised ``[N, d]`` vectors (momentum encoder).
        volumes: the client's ``[1, H, W, D]`` images.
        per_partition: keep at most this many randomly chosen slices per partition (``None``: all).
    """
    if not volumes:
        raise ValueError(f"client {client} has no volumes to embed")
    x, p = volume_slices(volumes, num_partitions)
    if per_partition is not None:
        order = per_partition_indices(p, num_partitions, per_partition, generator)
        x, p = x[order], p[order]
    vecs = torch.cat([embed(x[i : i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)])
    return BankEntries(vecs, p, torch.full_like(p, client))


def per_partition_indices(
    partitions: torch.Tensor, num_partitions: int, per_partition: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices of at most ``per_partition`` random items of each partition, in ascending order."""
    partitions = partitions.cpu()
    keep = []
    for s in range(num_partitions):
        idx = torch.nonzero(partitions == s).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=generator)[:per_partition]])
    return torch.cat(keep).sort().values


def subsample_per_partition(
    entries: BankEntries, num_partitions: int, per_partition: int | None, generator: torch.Generator | None = None
) -> BankEntries:
    """At most ``per_partition`` randomly chosen entries of each partition, in their original order."""
    if per_partition is None:
        return entries
    order = per_partition_indices(entries.partitions, num_partitions, per_partition, generator)
    return BankEntries(*(t[order.to(t.device)] for t in entries))


def check_payload(payload: BankEntries) -> None:
    """Assert a payload is only float vectors plus integer tags of matching length."""
    if not isinstance(payload, BankEntries) or len(payload._fields) != 3:
        raise TypeError("a feature payload is exactly (vectors, partitions, clients)")
    v, p, c = payload
    if v.ndim != 2 or not v.dtype.is_floating_point:
        raise TypeError(f"payload vectors must be a float [N, d] tensor, got {v.dtype} {tuple(v.shape)}")
    for name, t in (("partitions", p), ("clients", c)):
        if t.ndim != 1 or t.dtype != torch.long or len(t) != len(v):
            raise TypeError(f"payload {name} must be a long [N] tensor matching the vectors")
    if v.requires_grad:
        raise TypeError("payload vectors must not carry gradients")


def route(
    payloads: dict[int, BankEntries], dim: int, recipients: Iterable[int] | None = None
) -> dict[int, BankEntries]:
    """What each client receives: the concatenation of every *other* client's payload.

    Args:
        payloads: sender id -> its payload.
        recipients: who receives (default: the senders); a client never gets its own vectors.
    """
    for pl in payloads.values():
        check_payload(pl)
    recipients = sorted(payloads) if recipients is None else list(recipients)
    return {c: BankEntries.cat([pl for o, pl in sorted(payloads.items()) if o != c], dim) for c in recipients}


def payload_nbytes(payload: BankEntries) -> int:
    """Bytes on the wire for a payload (tensor storage; framing excluded)."""
    return tensor_nbytes(payload)
