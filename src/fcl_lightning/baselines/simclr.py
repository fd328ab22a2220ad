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

    def step(self, s: PretrainStep) -> tuple[dict[str, torch.Tensor], None]:
        z1, z2 = s.embed(s.views[0]), s.embed(s.views[1])
        b = z1.shape[0]
        labels = torch.arange(b, device=z1.device).repeat(2)
        loss = self.loss_fn(torch.cat([z1, z2]), labels)
        with torch.no_grad():
            pos_sim = (z1 * z2).sum(1).mean()
        return {"loss": loss, "pos_sim": pos_sim}, None
