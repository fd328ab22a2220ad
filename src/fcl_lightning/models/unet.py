"""2D segmentation U-Net whose contracting path is :class:`UNetEncoder` (keys ``encoder.*``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.basic_unet import UpCat
from torch import nn

from fcl_lightning.models.encoder import DEFAULT_FEATURES, UNetEncoder, norm_layer


def decoder_blocks(
    features: Sequence[int], norm: str = "instance", dropout: float = 0.0, levels: int | None = None
) -> nn.ModuleList:
    """The U-Net's expanding path (MONAI ``UpCat``), deepest block first; ``levels`` keeps only the
    first (deepest) ones, which is what pre-training with a dense term trains (same keys)."""
    act = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
    nrm = norm_layer(norm)
    fea = tuple(features)
    blocks = [
        UpCat(2, fea[i], fea[i - 1], fea[i - 1], act, nrm, True, dropout, halves=fea[i] > 1)
        for i in range(len(fea) - 1, 0, -1)
    ]
    return nn.ModuleList(blocks if levels is None else blocks[:levels])


def decode(encoder: UNetEncoder, decoder: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """Encoder, then the given decoder blocks with their skip connections: the feature map after
    the last block in ``decoder``."""
    return decode_skips(decoder, encoder(x))


def decode_skips(decoder: nn.ModuleList, skips: list[torch.Tensor]) -> torch.Tensor:
    """The given decoder blocks on an encoder's output (every level, bottleneck last)."""
    h = skips[-1]
    for up, skip in zip(decoder, reversed(skips[:-1])):
        h = up(h, skip)
    return h


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
        self.decoder = decoder_blocks(self.encoder.features, norm, dropout)
        self.final_conv = nn.Conv2d(self.encoder.features[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(decode(self.encoder, self.decoder, x))
