"""SimCLR (Chen et al. 2020): NT-Xent over two augmented views of every slice; the FedSimCLR
baseline when federated with FedAvg. The loss is pytorch-metric-learning's ``NTXentLoss``."""

from __future__ import annotations

import torch
from pytorch_metric_learning.losses import NTXentLoss

from fcl_lightning.fcl.objectives import PretrainObjective, PretrainStep


class SimCLRObjective(PretrainObjective):
    """Each slice's two views are positives; every other view in the batch is a negative.

    Args:
        temperature: NT-Xent temperature (SimCLR: 0.1-0.5).
    """

    uses_bank = False

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.loss_fn = NTXentLoss(temperature=temperature)

    def labels(self, s: PretrainStep) -> torch.Tensor:
        """NT-Xent labels of ``cat(view 1, view 2)``: same label = positive pair. SimCLR: the slice."""
        return torch.arange(len(s.partitions), device=s.partitions.device).repeat(2)

    def step(self, s: PretrainStep) -> tuple[dict[str, torch.Tensor], None]:
        z = torch.cat([s.embed(s.views[0]), s.embed(s.views[1])])
        labels = self.labels(s)
        loss = self.loss_fn(z, labels)
        with torch.no_grad():
            same = labels[:, None] == labels[None, :]
            eye = torch.eye(len(labels), dtype=torch.bool, device=z.device)
            sim = z @ z.T
            out = {"loss": loss, "pos_sim": sim[same & ~eye].mean()}
            if (~same).any():
                out["neg_sim"] = sim[~same].mean()
        return out, None
