"""Chaitanya et al. (NeurIPS 2020) global contrastive loss G_D: slices from the same partition of
different volumes are positives, as are a slice's two augmented views; slices of other partitions
are the negatives. Trained on each client alone (``federation.mode: local``) it is the paper's
"Local CL" baseline. The loss is pytorch-metric-learning's ``NTXentLoss`` with the partition
index as the label: every same-label pair is a positive pair and its denominator holds only the
other-label (other-partition) embeddings, which is G_D's definition."""

from __future__ import annotations

import torch

from fcl_lightning.baselines.simclr import SimCLRObjective
from fcl_lightning.fcl.objectives import PretrainStep


class PartitionContrastObjective(SimCLRObjective):
    """G_D over the two views of a partition-sampled batch (no memory bank): NT-Xent whose label
    is the slice's partition instead of the slice itself.

    Args:
        temperature: NT-Xent temperature (Chaitanya et al.: 0.1).
    """

    def labels(self, s: PretrainStep) -> torch.Tensor:
        return s.partitions.repeat(2)
