"""Server-side merging of client weights: plug-ins selected with ``class_path`` in
``federation.aggregator``. FedAvg (McMahan et al. 2017) weighted by training volumes is the default."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class Aggregator:
    """Base class: merge client state dicts into one global state dict."""

    def __call__(
        self, states: Sequence[dict[str, torch.Tensor]], num_samples: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class FedAvg(Aggregator):
    """Weighted mean of every tensor, computed in float64 and cast back to the tensor's dtype.

    Args:
        weighted: weight clients by their number of training samples (volumes); else uniformly.
    """

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = weighted

    def __call__(
        self, states: Sequence[dict[str, torch.Tensor]], num_samples: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        if not states:
            raise ValueError("FedAvg needs at least one client update")
        if len(states) != len(num_samples):
            raise ValueError("one sample count per client update is required")
        keys = list(states[0])
        for i, s in enumerate(states[1:], 1):
            if list(s) != keys:
                raise ValueError(f"client update {i} has different keys from update 0")
        w = [float(n) if self.weighted else 1.0 for n in num_samples]
        total = sum(w)
        if total <= 0:
            raise ValueError(f"FedAvg weights must sum to a positive number, got {w}")
        out = {}
        for k in keys:
            acc = torch.zeros_like(states[0][k], dtype=torch.float64)
            for wi, s in zip(w, states):
                acc += s[k].to(torch.float64) * (wi / total)
            ref = states[0][k]
            out[k] = acc.round().to(ref.dtype) if not ref.dtype.is_floating_point else acc.to(ref.dtype)
        return out


def tensor_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors' storage: what sending them costs (framing excluded); the one byte
    count of weights and of exchanged features."""
    return sum(t.numel() * t.element_size() for t in tensors)


def state_nbytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of a state dict's tensors (what a weight transfer costs)."""
    return tensor_nbytes(state.values())
