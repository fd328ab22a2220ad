"""2D segmentation U-Net whose contracting path is :class:`UNetEncoder` (keys ``encoder.*``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.basic_unet import UpCat
from torch import nn

from fcl_lightning.models.encoder import DEFAULT_FEATURES, UNetEncoder, norm_layer


class UNet(nn.Module):
    """U-Net = pre-trainable :class:`UNetEncoder` + MONAI ``UpCat`` decoder + 1x1 output conv."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 4,
        features: Sequence[int] = DEFAULT_FEATURES,
        norm: str = "instance",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder = UNetEncoder(in_channels, features, norm, dropout)
        fea = self.encoder.features
        act = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
        nrm = norm_layer(norm)
        self.decoder = nn.ModuleList(
            UpCat(2, fea[i], fea[i - 1], fea[i - 1], act, nrm, True, dropout, halves=fea[i] > 1)
            for i in range(len(fea) - 1, 0, -1)
        )
        self.final_conv = nn.Conv2d(fea[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = self.encoder(x)
        h = skips[-1]
        for up, skip in zip(self.decoder, reversed(skips[:-1])):
            h = up(h, skip)
        return self.final_conv(h)
