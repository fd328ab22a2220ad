"""Rotation prediction (Gidaris et al. 2018): classify which of 0/90/180/270 degrees a slice was
rotated by, from the encoder's bottleneck features; the FedRotation baseline with FedAvg."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fcl_lightning.fcl.objectives import PretrainObjective, PretrainStep


def rotate_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All four rotations of every slice: ``[4B, C, H, W]`` and labels ``0..3`` (k * 90 degrees)."""
    views = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
    return torch.cat(views), labels


class RotationObjective(PretrainObjective):
    """Cross-entropy of a linear classifier (global average pool -> 4 classes); the classifier is
    trained and federated with the encoder, and dropped at fine-tuning.

    Args:
        views: rotate the first view only (1) or both augmented views (2).
    """

    uses_bank = False

    def __init__(self, views: int = 1) -> None:
        super().__init__()
        if views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {views}")
        self.views = views
        self.classifier: nn.Module = nn.Identity()

    def build(self, feature_channels: int, embed_dim: int) -> None:
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(feature_channels, 4))

    def step(self, s: PretrainStep) -> tuple[dict[str, torch.Tensor], None]:
        x = s.views[0] if self.views == 1 else torch.cat(s.views)
        xr, y = rotate_batch(x)
        logits = self.classifier(s.encode(xr))
        loss = F.cross_entropy(logits, y)
        with torch.no_grad():
            acc = (logits.argmax(1) == y).float().mean()
        return {"loss": loss, "rotation_acc": acc}, None
