"""Memory bank: a FIFO queue of momentum-encoder vectors with their partition index and client id."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class BankEntries(NamedTuple):
    """Vectors of a bank (or an exchange payload) with their integer tags."""

    vectors: torch.Tensor  # [N, dim]
    partitions: torch.Tensor  # [N] long
    clients: torch.Tensor  # [N] long

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def to(self, device: torch.device | str) -> BankEntries:
        return BankEntries(*(t.to(device) for t in self))

    @staticmethod
    def empty(dim: int, device: torch.device | str = "cpu") -> BankEntries:
        z = torch.zeros(0, dtype=torch.long, device=device)
        return BankEntries(torch.zeros(0, dim, device=device), z, z.clone())

    @staticmethod
    def cat(parts: list[BankEntries], dim: int) -> BankEntries:
        """Concatenate; an all-empty result stays on the device of the parts given."""
        full = [p for p in parts if len(p)]
        if not full:
            return parts[0] if parts else BankEntries.empty(dim)
        return BankEntries(*(torch.cat(ts) for ts in zip(*full)))


class MemoryBank(nn.Module):
    """Fixed-capacity queue stored in registered buffers, so checkpoints carry it.

    ``forward(entries, update=True)`` returns the filled part of the bank as it was *before*
    ``entries`` are enqueued (a batch never contrasts against itself), then enqueues them,
    overwriting the oldest entries once full.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"bank size must be positive, got {size}")
        self.size, self.dim = int(size), int(dim)
        self.register_buffer("vectors", torch.zeros(self.size, self.dim))
        self.register_buffer("partitions", torch.full((self.size,), -1, dtype=torch.long))
        self.register_buffer("clients", torch.full((self.size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @property
    def fill(self) -> float:
        """Fraction of the bank that holds vectors."""
        return int(self.count) / self.size

    def entries(self) -> BankEntries:
        """The filled part, oldest first."""
        n, p = int(self.count), int(self.ptr)
        order = torch.arange(p - n, p, device=self.vectors.device) % self.size
        return BankEntries(self.vectors[order].clone(), self.partitions[order].clone(), self.clients[order].clone())

    @torch.no_grad()
    def enqueue(self, entries: BankEntries) -> None:
        """Append ``entries``; only the newest ``size`` survive if more are given."""
        v, part, cl = (t.detach().to(self.vectors.device) for t in entries)
        if v.shape[0] > self.size:
            v, part, cl = v[-self.size :], part[-self.size :], cl[-self.size :]
        n, p = v.shape[0], int(self.ptr)
        idx = (torch.arange(n, device=v.device) + p) % self.size
        self.vectors[idx] = v.to(self.vectors.dtype)
        self.partitions[idx] = part.long()
        self.clients[idx] = cl.long()
        self.ptr.fill_((p + n) % self.size)
        self.count.fill_(min(int(self.count) + n, self.size))

    @torch.no_grad()
    def reset(self) -> None:
        self.partitions.fill_(-1)
        self.clients.fill_(-1)
        self.vectors.zero_()
        self.ptr.zero_()
        self.count.zero_()

    def replace(self, entries: BankEntries) -> None:
        """Empty the bank and fill it with ``entries`` (how a remote bank takes a new exchange)."""
        self.reset()
        self.enqueue(entries)

    def forward(self, entries: BankEntries | None = None, update: bool = True) -> BankEntries:
        before = self.entries()
        if update and entries is not None:
            self.enqueue(entries)
        return before
