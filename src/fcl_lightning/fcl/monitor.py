"""Is pre-training learning? Collapse and learning monitors on a fixed probe set of clean slices.

A falling contrastive loss proves nothing (issue 12: on ACDC the loss fell while every slice
embedded to the same vector). These figures do:

- ``spread``: mean distance of the L2-normalised embeddings to their mean vector (0: collapsed to
  one vector; about 1 for vectors spread over the sphere); ``mean_cos``: mean pairwise cosine.
- ``probe_acc``: a k-NN partition probe (cosine, majority vote, as solo-learn's online k-NN)
  scored leave-one-patient-out, so a slice is classified only by slices of *other* patients;
  chance is ``1/S``. On held-out patients it says whether the embedding carries anatomy that
  generalises; ``probe_acc_encoder`` does the same on the encoder's pooled bottleneck, below the
  projection head (what fine-tuning inherits).

Framework-free: :class:`CollapseMonitor` takes a callable that embeds slices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy

from fcl_lightning.fcl.partition import volume_slices


def embedding_spread(z: torch.Tensor) -> dict[str, float]:
    """``spread`` (mean ``||z_i - mean(z)||``) and ``mean_cos`` (mean off-diagonal cosine) of ``z``."""
    z = F.normalize(z.double(), dim=1)
    n = z.shape[0]
    spread = (z - z.mean(0, keepdim=True)).norm(dim=1).mean()
    s = z.sum(0)
    mean_cos = (s @ s - n) / max(1, n * (n - 1))  # sum over i != j of z_i . z_j, each norm 1
    return {"spread": float(spread), "mean_cos": float(mean_cos)}


def knn_probe_accuracy(z: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, k: int = 10) -> float:
    """Leave-one-group-out cosine k-NN accuracy: each item is classified by the majority label of
    its ``k`` most similar items from *other* groups (ties go to the smaller label)."""
    z = F.normalize(z.double(), dim=1)
    sim = z @ z.T
    sim = sim.masked_fill(groups[:, None] == groups[None, :], float("-inf"))
    kk = min(k, int((groups[:, None] != groups[None, :]).sum(1).min()))
    if kk < 1:
        raise ValueError("the k-NN probe needs items from at least two groups")
    idx = sim.topk(kk, dim=1).indices
    num_classes = int(labels.max()) + 1
    votes = F.one_hot(labels[idx], num_classes).sum(1)
    if num_classes < 2:  # one class: every vote is right (torchmetrics wants two)
        return 1.0
    return float(multiclass_accuracy(votes.argmax(1), labels, num_classes=num_classes, average="micro"))


class CollapseMonitor:
    """Spread and k-NN partition probe of a fixed set of clean slices, logged every round.

    Args:
        every_n_rounds: compute after every this many rounds (and after the last).
        max_volumes: use at most this many probe volumes (the first ones, a fixed set).
        k: neighbours of the k-NN probe.
        collapse_spread: a ``spread`` below this is reported as a collapse in the round line.
    """

    def __init__(
        self, every_n_rounds: int = 1, max_volumes: int = 40, k: int = 10, collapse_spread: float = 0.1
    ) -> None:
        if every_n_rounds < 1 or max_volumes < 2 or k < 1:
            raise ValueError("monitor: every_n_rounds and k must be >= 1, max_volumes >= 2")
        self.every_n_rounds, self.max_volumes, self.k = every_n_rounds, max_volumes, k
        self.collapse_spread = collapse_spread

    def due(self, done: int, rounds: int) -> bool:
        return done % self.every_n_rounds == 0 or done == rounds

    @torch.no_grad()
    def measure(
        self,
        features: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
        volumes: Sequence[torch.Tensor],
        patients: Sequence[str],
        num_partitions: int,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
    ) -> dict[str, float]:
        """Figures for ``volumes`` (``[1, H, W, D]`` images, with the patient each belongs to).

        ``features`` maps ``[N, 1, H, W]`` slices to their embeddings ``[N, d]`` and, optionally,
        the encoder's pooled features ``[N, c]`` (one encoder pass for both)."""
        vols, pats = list(volumes)[: self.max_volumes], list(patients)[: self.max_volumes]
        x, parts = volume_slices(vols, num_partitions)  # [N, 1, H, W], [N]
        ids = {p: i for i, p in enumerate(dict.fromkeys(pats))}
        groups = torch.cat([torch.full((v.shape[-1],), ids[p]) for v, p in zip(vols, pats)])
        z, h = [], []
        for i in range(0, len(x), batch_size):
            zb, hb = features(x[i : i + batch_size].to(device))
            z.append(zb.float().cpu())
            if hb is not None:
                h.append(hb.float().cpu())
        z = torch.cat(z)
        out = {**embedding_spread(z), "probe_acc": knn_probe_accuracy(z, parts, groups, self.k)}
        if h:
            out["probe_acc_encoder"] = knn_probe_accuracy(torch.cat(h), parts, groups, self.k)
        return out
