"""Chaitanya et al. (NeurIPS 2020) global contrastive loss G_D: slices from the same partition of
different volumes are positives, as are a slice's two augmented views; slices of other partitions
are the negatives. Trained on each client alone (``federation.mode: local``) it is the paper's
"Local CL" baseline. The loss is pytorch-metric-learning's ``NTXentLoss`` with the partition
index as the label: every same-label pair is a positive pair and its denominator holds only the
other-label (other-partition) embeddings, which is G_D's definition."""

from __future__ import annotations

import torch
from pytorch_metric_learning.losses import NTXentLoss

from fcl_lightning.fcl.objectives import PretrainObjective, PretrainStep


class PartitionContrastObjective(PretrainObjective):
    """G_D over the two views of a partition-sampled batch (no memory bank).

    Args:
        temperature: NT-Xent temperature (Chaitanya et al.: 0.1).
    """

    uses_bank = False

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.loss_fn = NTXentLoss(temperature=temperature)

    def step(self, s: PretrainStep) -> tuple[dict[str, torch.Tensor], None]:
        z = torch.cat([s.embed(s.views[0]), s.embed(s.views[1])])
        labels = s.partitions.repeat(2)
        loss = self.loss_fn(z, labels)
        with torch.no_grad():
            same = labels[:, None] == labels[None, :]
            eye = torch.eye(len(labels), dtype=torch.bool, device=z.device)
            sim = z @ z.T
            pos_sim = sim[same & ~eye].mean()
            neg_sim = sim[~same].mean() if (~same).any() else sim.new_tensor(float("nan"))
        return {"loss": loss, "pos_sim": pos_sim, "neg_sim": neg_sim}, None
