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
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fcl_lightning.fcl.dense import dense_local_loss, intensity_view, random_crop_warp, region_vectors, warp
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
    #: one main-encoder pass: queries and the feature map of the pre-trained decoder blocks
    embed_decode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


class PretrainObjective(nn.Module):
    """Base class of pre-training objectives.

    ``uses_bank``: the objective contrasts against the memory banks, so the module enqueues its
    keys and the federation exchanges features (FCL); baselines without banks set it ``False``.
    """

    uses_bank: bool = True
    #: the objective trains decoder blocks too (``model.decoder_levels`` must be >= 1)
    needs_decoder: bool = False

    def build(self, feature_channels: int, embed_dim: int) -> None:
        """Create parameters that depend on the encoder (bottleneck channels) or head (vector size)."""

    def build_decoder(self, decoder_channels: int) -> None:
        """Create parameters that depend on the channels of the pre-trained decoder's output."""

    def step(self, s: PretrainStep) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Loss and metrics of one step, and the keys to enqueue (default: MoCo-style q/k)."""
        q = s.embed(s.views[0])
        k = s.embed_keys(s.views[1])
        return self(ContrastiveInputs(q, k, s.partitions, s.volumes, s.bank)), k

    def forward(self, inputs: ContrastiveInputs) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class FCLObjective(PretrainObjective):
    """``L = w_local * L_local + w_remote * L_remote`` (FCL, Wu et al. 2021, Sec. 2).

    The paper's local term divides fresh in-batch positives by bank negatives only. Keys in a
    bank were written by an older momentum encoder (earlier steps, before FedAvg, or another
    client's last round), so a *constant* embedding that drifts over time already separates the
    positives from every negative, and on real data the embedding collapses to one vector
    (issue 12). The default therefore draws the local term's negatives from the batch itself:
    keys of the other partitions, computed by the same encoder at the same step as the positives.
    The bank ``Q'`` (local + remote, tagged with partitions) feeds the global structural matching
    term, whose positives and negatives are drawn from the same bank, so their age cannot tell
    them apart either. ``local_negatives="bank"`` with ``same_partition_negatives=True`` is the
    paper's literal formula (collapses on ACDC, kept as an ablation).

    Args:
        temperature: ``t`` of the InfoNCE terms (Chaitanya et al. use 0.1).
        num_negatives: ``K``, size of ``Q'`` drawn uniformly from local + remote banks.
        w_local: weight of the local partition-aware term (paper: 1).
        w_remote: weight of the global structural matching term (paper: 1; 0 = ablation).
        self_positive: also count the query's own momentum key as a local positive.
        local_negatives: denominator of the local term: ``batch`` (the batch's keys of other
            partitions; default, freshness-proof), ``bank`` (``Q'``, the paper) or ``both``.
        same_partition_negatives: with bank negatives in the local term, keep ``Q'`` entries of
            the query's own partition there (the paper) instead of dropping them.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        num_negatives: int = 512,
        w_local: float = 1.0,
        w_remote: float = 1.0,
        self_positive: bool = False,
        local_negatives: Literal["batch", "bank", "both"] = "batch",
        same_partition_negatives: bool = False,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        if local_negatives not in ("batch", "bank", "both"):
            raise ValueError(f"local_negatives must be 'batch', 'bank' or 'both', got {local_negatives!r}")
        self.temperature = temperature
        self.num_negatives = num_negatives
        self.w_local = w_local
        self.w_remote = w_remote
        self.self_positive = self_positive
        self.local_negatives = local_negatives
        self.same_partition_negatives = same_partition_negatives

    def forward(self, inputs: ContrastiveInputs) -> dict[str, torch.Tensor]:
        negs = sample_negatives(inputs.bank, self.num_negatives)
        local_negs = negs if self.local_negatives != "batch" else BankEntries(*(t[:0] for t in negs))
        l_local = local_loss(
            inputs.q,
            inputs.k,
            inputs.partitions,
            inputs.volumes,
            local_negs,
            self.temperature,
            self.self_positive,
            batch_negatives=self.local_negatives != "bank",
            same_partition_negatives=self.same_partition_negatives,
        )
        l_remote = remote_loss(inputs.q, inputs.partitions, negs, self.temperature)
        out = {
            "loss": self.w_local * l_local + self.w_remote * l_remote,
            "loss_local": l_local.detach(),
            **same_age_similarities(inputs.q, inputs.k, inputs.partitions, inputs.volumes, self.self_positive),
        }
        # the remote term of this step's loss, 0 while the banks are empty: the epoch means then add
        # up, w_local * local + w_remote * remote_in_loss = loss (the round line shows it)
        out["remote_in_loss"] = l_remote.detach() if len(negs) else torch.zeros((), device=inputs.q.device)
        if len(negs):  # the first steps have an empty bank: no figure rather than a NaN or a 0 in the epoch mean
            out["loss_remote"] = l_remote.detach()
            out["bank_sim"] = (inputs.q @ negs.vectors.T).mean().detach()
        return out


@torch.no_grad()
def same_age_similarities(
    q: torch.Tensor, k: torch.Tensor, partitions: torch.Tensor, volumes: torch.Tensor, self_positive: bool = False
) -> dict[str, torch.Tensor]:
    """Mean cosine of queries to their local positives (``pos_sim``) and to the batch's keys of
    other partitions (``neg_sim``): keys of the same age, so the gap measures content. (Against
    bank entries the gap would measure how much older the bank is.)"""
    sim = q @ k.T
    pos_mask = local_positive_mask(partitions, volumes, self_positive)
    neg_mask = partitions[:, None] != partitions[None, :]
    nan = sim.new_tensor(float("nan"))
    return {
        "pos_sim": sim[pos_mask].mean() if pos_mask.any() else nan,
        "neg_sim": sim[neg_mask].mean() if neg_mask.any() else nan,
    }


class DenseFCLObjective(FCLObjective):
    """FCL plus a local (dense) contrastive term on decoder features (after Chaitanya et al.
    2020's L_l; an opt-in extension, not in Wu et al.): ``L_FCL + w_dense * L_dense``. Needs
    ``model.decoder_levels >= 1``; those decoder blocks are federated with the encoder and
    ``encoder.pt`` carries them to fine-tuning.

    The second view is the first one with new intensities and, with ``warp``, a random rotated
    zoom-in crop; the first view's decoder features are warped by the same map, so each region
    is matched to the same anatomy (:mod:`fcl_lightning.fcl.dense`). The default is the aligned,
    same-slice variant: the network solves it almost at once on ACDC, yet it gave the larger
    fine-tuning gain there; the warped and across-batch variants keep a loss but gave less
    (experiments/README.md, 2 seeds).

    Args:
        w_dense: weight of the dense term.
        grid: the decoder feature map is cut into ``grid x grid`` regions.
        dense_temperature: temperature of the dense term.
        dense_dim: size of the region embeddings (an MLP on each region's mean decoder feature).
        warp: the second view is a random rotated crop of the first (features warped to match).
        across_batch: a region's negatives are all other regions of the batch (else its slice's).
        max_rotate_deg: largest rotation of the crop.
        crop_scale: range of the crop's side relative to the image's.
        **fcl: the arguments of :class:`FCLObjective`.
    """

    needs_decoder = True

    def __init__(
        self,
        w_dense: float = 1.0,
        grid: int = 4,
        dense_temperature: float = 0.1,
        dense_dim: int = 64,
        warp: bool = False,
        across_batch: bool = False,
        max_rotate_deg: float = 15.0,
        crop_scale: tuple[float, float] = (0.6, 0.8),
        **fcl: Any,
    ) -> None:
        super().__init__(**fcl)
        if grid < 2 or dense_temperature <= 0 or dense_dim < 1:
            raise ValueError("DenseFCLObjective: grid must be >= 2, dense_temperature > 0, dense_dim >= 1")
        random_crop_warp(1, max_rotate_deg, tuple(crop_scale))  # validates crop_scale now, not at the first step
        self.w_dense, self.grid, self.dense_temperature, self.dense_dim = w_dense, grid, dense_temperature, dense_dim
        self.warp, self.across_batch = warp, across_batch
        self.max_rotate_deg, self.crop_scale = max_rotate_deg, tuple(crop_scale)

    def build_decoder(self, decoder_channels: int) -> None:
        self.dense_head = nn.Sequential(
            nn.Linear(decoder_channels, decoder_channels),
            nn.ReLU(inplace=True),
            nn.Linear(decoder_channels, self.dense_dim),
        )

    def step(self, s: PretrainStep) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        if s.embed_decode is None:
            raise ValueError("DenseFCLObjective needs decoder blocks: set model.init_args.decoder_levels >= 1")
        x = s.views[0]
        q, f1 = s.embed_decode(x)  # the query view's encoder pass serves both terms
        keys = s.embed_keys(s.views[1])
        out = self(ContrastiveInputs(q, keys, s.partitions, s.volumes, s.bank))
        x2 = intensity_view(x)
        if self.warp:  # the second view is a crop of the first; f1 is cut by the same map
            theta = random_crop_warp(len(x), self.max_rotate_deg, self.crop_scale).to(x.device)
            f1, x2 = warp(f1, theta), warp(x2, theta)
        f2 = s.embed_decode(x2)[1]
        z1, z2 = (F.normalize(self.dense_head(region_vectors(f, self.grid)), dim=-1) for f in (f1, f2))
        l_dense = dense_local_loss(z1, z2, self.dense_temperature, self.across_batch)
        out["loss"] = out["loss"] + self.w_dense * l_dense
        out["loss_dense"] = l_dense.detach()
        return out, keys


def partition_positive_mask(partitions: torch.Tensor) -> torch.Tensor:
    """``[B, B]``: slices of the same partition (own slice included: its key is the other view)."""
    return partitions[:, None] == partitions[None, :]


def byol_partition_loss(p: torch.Tensor, k: torch.Tensor, partitions: torch.Tensor) -> torch.Tensor:
    """Mean over queries of the mean ``2 - 2 cos(p_i, k_j)`` over the keys ``j`` of the same
    partition (BYOL's regression loss, with the partition-aware positives of FCL)."""
    pos = partition_positive_mask(partitions).float()
    dist = 2 - 2 * F.normalize(p, dim=1) @ F.normalize(k, dim=1).T
    return ((dist * pos).sum(1) / pos.sum(1)).mean()


class FCLOptObjective(PretrainObjective):
    """FCLOpt (Wu et al., Medical Image Analysis 2022, the journal extension of FCL): no
    negatives, so no memory banks and no feature exchange. An online encoder + head + predictor
    regresses the momentum (target) encoder's keys of the slices of the same partition, BYOL-style
    (Grill et al. 2020), symmetrised over the two views; the encoder, head and predictor are
    federated with FedAvg as in FCL, the target nets stay with each client. Needs
    ``model.use_momentum: true`` (the target is the momentum copy).

    Args:
        predictor_hidden: hidden width of the predictor MLP (BYOL: 4096 for a 256-d output).
    """

    uses_bank = False

    def __init__(self, predictor_hidden: int = 512) -> None:
        super().__init__()
        if predictor_hidden < 1:
            raise ValueError(f"predictor_hidden must be >= 1, got {predictor_hidden}")
        self.predictor_hidden = predictor_hidden

    def build(self, feature_channels: int, embed_dim: int) -> None:
        self.predictor = nn.Sequential(
            nn.Linear(embed_dim, self.predictor_hidden),
            nn.BatchNorm1d(self.predictor_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(self.predictor_hidden, embed_dim),
        )

    def step(self, s: PretrainStep) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        v1, v2 = s.views
        p1, p2 = self.predictor(s.embed(v1)), self.predictor(s.embed(v2))
        k1, k2 = s.embed_keys(v1), s.embed_keys(v2)
        loss = 0.5 * (byol_partition_loss(p1, k2, s.partitions) + byol_partition_loss(p2, k1, s.partitions))
        with torch.no_grad():
            sims = same_age_similarities(F.normalize(p1, dim=1), k2, s.partitions, s.volumes, self_positive=True)
        return {"loss": loss, **sims}, None
