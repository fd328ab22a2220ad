"""SwAV (Caron et al. 2020): online clustering with learnable prototypes, Sinkhorn-Knopp codes
and swapped prediction between two views; the FedSwAV baseline with FedAvg.

Written here because the maintained implementation (lightly's ``SwaVLoss``) would bring
torchvision, a second Lightning package and hydra with it. Two views only (no multi-crop) and no
feature queue: client batches are small, as in the FCL paper's setting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fcl_lightning.fcl.objectives import PretrainObjective, PretrainStep


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Soft codes ``Q`` [B, K] from prototype scores [B, K]: equipartition over prototypes.

    After the iterations every row sums to 1 (one assignment per sample) and every column to
    ``B / K`` (prototypes used equally), up to the convergence of the last column step.
    """
    q = torch.exp((scores - scores.max()) / epsilon).T  # [K, B]; shift for stability
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).T


class SwAVObjective(PretrainObjective):
    """Swapped prediction: the codes of one view are the targets of the other view's softmax.

    Args:
        num_prototypes: number of prototypes K.
        temperature: softmax temperature of the predictions (SwAV: 0.1).
        epsilon: Sinkhorn entropy regularisation (SwAV: 0.05).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (SwAV: 3).
    """

    uses_bank = False

    def __init__(
        self, num_prototypes: int = 64, temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iterations: int = 3
    ) -> None:
        super().__init__()
        if num_prototypes < 2:
            raise ValueError(f"num_prototypes must be >= 2, got {num_prototypes}")
        self.num_prototypes, self.temperature = num_prototypes, temperature
        self.epsilon, self.sinkhorn_iterations = epsilon, sinkhorn_iterations
        self.prototypes: nn.Module = nn.Identity()

    def build(self, feature_channels: int, embed_dim: int) -> None:
        self.prototypes = nn.Linear(embed_dim, self.num_prototypes, bias=False)

    def swapped_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """``-1/2 [sum q2 log p1 + sum q1 log p2]`` averaged over the batch (z L2-normalised)."""
        s1, s2 = self.prototypes(z1), self.prototypes(z2)
        q1 = sinkhorn(s1.detach(), self.epsilon, self.sinkhorn_iterations)
        q2 = sinkhorn(s2.detach(), self.epsilon, self.sinkhorn_iterations)
        l12 = -(q2 * F.log_softmax(s1 / self.temperature, dim=1)).sum(1).mean()
        l21 = -(q1 * F.log_softmax(s2 / self.temperature, dim=1)).sum(1).mean()
        return (l12 + l21) / 2

    def step(self, s: PretrainStep) -> tuple[dict[str, torch.Tensor], None]:
        with torch.no_grad():  # prototypes stay on the unit sphere (SwAV normalises them every step)
            w = self.prototypes.weight
            w.copy_(F.normalize(w, dim=1))
        z1, z2 = s.embed(s.views[0]), s.embed(s.views[1])
        loss = self.swapped_loss(z1, z2)
        return {"loss": loss}, None
