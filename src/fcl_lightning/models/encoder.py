"""The U-Net encoder that stage 1 pre-trains and stage 2 loads by key, and the projection head.

Built from MONAI's ``BasicUNet`` blocks (``TwoConv``, ``Down``) so the segmentation U-Net
(:class:`fcl_lightning.models.unet.UNet`) holds the very same module under ``encoder.``.
Default channels follow Chaitanya et al. (NeurIPS 2020): 16-32-64-128-128-128.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from monai.networks.nets.basic_unet import Down, TwoConv
from torch import nn

DEFAULT_FEATURES: tuple[int, ...] = (16, 32, 64, 128, 128, 128)


def norm_layer(norm: str) -> tuple:
    """MONAI norm spec for a short name: ``instance`` (default; no running stats, so nothing
    to average or EMA but weights) or ``batch``."""
    if norm == "instance":
        return ("instance", {"affine": True})
    if norm == "batch":
        return ("batch", {})
    raise ValueError(f"norm must be 'instance' or 'batch', got {norm!r}")


class UNetEncoder(nn.Module):
    """Contracting path of a 2D U-Net: ``conv_0`` at full resolution, then ``down_1..down_n``.

    ``forward`` returns every level's feature map (the U-Net's skip connections); the last one
    is the bottleneck that the projection head pools.
    """

    def __init__(
        self,
        in_channels: int = 1,
        features: Sequence[int] = DEFAULT_FEATURES,
        norm: str = "instance",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(features) < 2:
            raise ValueError("features needs at least two levels")
        self.features = tuple(int(f) for f in features)
        act = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
        nrm = norm_layer(norm)
        self.conv_0 = TwoConv(2, in_channels, self.features[0], act, nrm, True, dropout)
        for i in range(1, len(self.features)):
            self.add_module(f"down_{i}", Down(2, self.features[i - 1], self.features[i], act, nrm, True, dropout))

    @property
    def downsampling(self) -> int:
        """Factor by which the input side must be divisible."""
        return 2 ** (len(self.features) - 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[-1] % self.downsampling or x.shape[-2] % self.downsampling:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} must be divisible by {self.downsampling} "
                f"for an encoder with {len(self.features)} levels"
            )
        out = [self.conv_0(x)]
        for i in range(1, len(self.features)):
            out.append(getattr(self, f"down_{i}")(out[-1]))
        return out


class ProjectionHead(nn.Module):
    """Bottleneck -> adaptive average pool to ``pool x pool`` -> flatten -> FC [-> BN] -> ReLU -> FC.

    With ``pool=4`` on a 128x128 input this is exactly Chaitanya's flatten -> FC 1024 -> FC 128;
    pooling first keeps the head independent of the image size. ``norm="batch"`` puts a
    BatchNorm after the hidden layer (as SimCLR's and MoCo v2's heads): it centres every batch's
    hidden features, so the head cannot map the whole batch to one vector, which is how FCL's
    embedding collapsed in its first rounds on ACDC (README, "The FCL objective").
    """

    def __init__(
        self,
        in_channels: int = 128,
        pool: int = 4,
        hidden_dim: int = 1024,
        out_dim: int = 128,
        norm: Literal["none", "batch"] = "none",
    ) -> None:
        super().__init__()
        if norm not in ("none", "batch"):
            raise ValueError(f"head_norm must be 'none' or 'batch', got {norm!r}")
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * pool * pool, hidden_dim),
            *([nn.BatchNorm1d(hidden_dim)] if norm == "batch" else []),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pool(x))
