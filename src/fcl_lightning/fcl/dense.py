"""Local (dense) contrastive term on decoder features, after Chaitanya et al. (NeurIPS 2020), L_l.

An opt-in extension of FCL (not in Wu et al.): the first decoder blocks of the U-Net are
pre-trained too, so that fine-tuning with one labelled patient does not start its decoder from
scratch. Two *spatially aligned* views of a slice (they differ in intensity only) go through the
encoder and the first decoder blocks; the feature map is cut into a ``grid x grid`` set of
regions; a region's positive is the same region in the other view, its negatives the other
regions of the same slice in both views. Hand-written: no maintained library has this loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def region_vectors(fmap: torch.Tensor, grid: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, grid * grid, C]``: the mean feature of each cell of a regular grid."""
    return F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2)


def dense_local_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over the regions of each slice.

    Args:
        z1, z2: ``[B, R, d]`` L2-normalised region embeddings of the two aligned views.
        temperature: softmax temperature.

    Returns:
        The mean over all ``2 * B * R`` anchors of ``-log(exp(a.p/t) / sum_{o != a} exp(a.o/t))``,
        ``p`` the anchor's region in the other view, ``o`` every other region of the same slice.
    """
    b, r, _ = z1.shape
    z = torch.cat([z1, z2], dim=1)  # [B, 2R, d]
    logits = z @ z.transpose(1, 2) / temperature  # [B, 2R, 2R]
    eye = torch.eye(2 * r, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    target = torch.cat([torch.arange(r, 2 * r), torch.arange(0, r)]).to(z.device)
    return F.cross_entropy(logits.reshape(b * 2 * r, 2 * r), target.repeat(b))


def intensity_view(x: torch.Tensor, brightness: float = 0.1, contrast: float = 0.2,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """A spatially aligned second view: per-slice random contrast around the slice mean, then a
    random brightness shift (batched, on ``x``'s device)."""
    n = x.shape[0]
    shape = (n,) + (1,) * (x.ndim - 1)
    c = 1 + contrast * (2 * torch.rand(shape, generator=generator) - 1)
    s = brightness * (2 * torch.rand(shape, generator=generator) - 1)
    c, s = c.to(x), s.to(x)
    mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return (x - mean) * c + mean + s
