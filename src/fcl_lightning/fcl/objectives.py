"""Pre-training objectives: plug-ins selected with ``class_path`` in ``model.init_args.objective``.

The pre-training module hands every step a :class:`PretrainStep` (two augmented views, partition
and volume tags, the nets as callables, the memory bank); the objective returns a dict of scalars
holding ``loss`` and the keys to enqueue in the local bank (``None`` for objectives without a
bank). Objectives may own parameters (a classifier, prototypes): they are trained and federated
with the encoder. FCL is here; the baselines are in :mod:`fcl_lightning.baselines`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fcl_lightning.fcl.losses import local_loss, local_positive_mask, remote_loss, sample_negatives
from fcl_lightning.fcl.memory_bank import BankEntries


@dataclass
class ContrastiveInputs:
    """What a step hands its objective. Vectors are L2-normalised."""

    q: torch.Tensor  # [B, d] main-encoder queries
    k: torch.Tensor  # [B, d] momentum-encoder keys (detached)
    partitions: torch.Tensor  # [B]
    volumes: torch.Tensor  # [B]
    bank: BankEntries  # Q: local bank + remote bank, as before this batch


@dataclass
class PretrainStep:
    """One training step as an objective sees it; the nets are called only if it needs them."""

    views: tuple[torch.Tensor, torch.Tensor]  # two augmented views [B, 1, H, W] of the same slices
    partitions: torch.Tensor  # [B] partition index of each slice
    volumes: torch.Tensor  # [B] volume index of each slice (within the batch's client)
    embed: Callable[[torch.Tensor], torch.Tensor]  # main encoder + head, L2-normalised
    embed_keys: Callable[[torch.Tensor], torch.Tensor]  # momentum encoder + head, no gradient
    encode: Callable[[torch.Tensor], torch.Tensor]  # main encoder bottleneck feature map
    bank: BankEntries  # Q: local bank + remote bank, as before this batch


class PretrainObjective(nn.Module):
    """Base class of pre-training objectives.

    ``uses_bank``: the objective contrasts against the memory banks, so the module enqueues its
    keys and the federation exchanges features (FCL); baselines without banks set it ``False``.
    """

    uses_bank: bool = True

    def build(self, feature_channels: int, embed_dim: int) -> None:
        """Create parameters that depend on the encoder (bottleneck channels) or head (vector size)."""

    def step(self, s: PretrainStep) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Loss and metrics of one step, and the keys to enqueue (default: MoCo-style q/k)."""
        q = s.embed(s.views[0])
        k = s.embed_keys(s.views[1])
        return self(ContrastiveInputs(q, k, s.partitions, s.volumes, s.bank)), k

    def forward(self, inputs: ContrastiveInputs) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class FCLObjective(PretrainObjective):
    """``L = w_local * L_local + w_remote * L_remote`` (FCL, Wu et al. 2021, Sec. 2).

    Args:
        temperature: ``t`` of the InfoNCE terms (Chaitanya et al. use 0.1).
        num_negatives: ``K``, size of ``Q'`` drawn uniformly from local + remote banks.
        w_local: weight of the local partition-aware term (paper: 1).
        w_remote: weight of the global structural matching term (paper: 1; 0 = ablation).
        self_positive: also count the query's own momentum key as a local positive.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        num_negatives: int = 512,
        w_local: float = 1.0,
        w_remote: float = 1.0,
        self_positive: bool = False,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        self.temperature = temperature
        self.num_negatives = num_negatives
        self.w_local = w_local
        self.w_remote = w_remote
        self.self_positive = self_positive

    def forward(self, inputs: ContrastiveInputs) -> dict[str, torch.Tensor]:
        negs = sample_negatives(inputs.bank, self.num_negatives)
        l_local = local_loss(inputs.q, inputs.k, inputs.partitions, inputs.volumes, negs, self.temperature, self.self_positive)
        l_remote = remote_loss(inputs.q, inputs.partitions, negs, self.temperature)
        with torch.no_grad():
            pos_mask = local_positive_mask(inputs.partitions, inputs.volumes, self.self_positive)
            sim = inputs.q @ inputs.k.T
            pos_sim = sim[pos_mask].mean() if pos_mask.any() else sim.new_tensor(float("nan"))
        out = {
            "loss": self.w_local * l_local + self.w_remote * l_remote,
            "loss_local": l_local.detach(),
            "loss_remote": l_remote.detach(),
            "pos_sim": pos_sim,
        }
        if len(negs):  # the very first step has an empty bank: no figure rather than a NaN in the epoch mean
            out["neg_sim"] = (inputs.q @ negs.vectors.T).mean().detach()
        return out
