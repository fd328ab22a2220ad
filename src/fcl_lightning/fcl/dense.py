"""Local (dense) contrastive term on decoder features, after Chaitanya et al. (NeurIPS 2020), L_l.

An opt-in extension of FCL (not in Wu et al.): the first decoder blocks of the U-Net are
pre-trained too, so that fine-tuning with one labelled patient does not start its decoder from
scratch. Two views of a slice go through the encoder and the first decoder blocks; the feature
map is cut into a ``grid x grid`` set of regions; a region's positive is the same anatomy in the
other view, its negatives other regions.

With views that differ in intensity only and negatives from the same slice (Chaitanya et al.'s
L_l; the default) the term is solved within a round: a region is told from its neighbours by
where it sits. Two harder options: (1) warp the second view with a random zoom-in crop and
rotation (:func:`random_crop_warp`) and the first view's feature map by the same map
(:func:`warp`), so regions correspond by anatomy, not by position in the image; (2) draw
negatives from every region of the batch, including the same grid cell of other slices, which
shares its position but not its content. On ACDC both keep a loss but gave a smaller
fine-tuning gain than the default (experiments/README.md). Hand-written: no maintained
library has this loss (the warp is ``torch``'s ``affine_grid``/``grid_sample``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def region_vectors(fmap: torch.Tensor, grid: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, grid * grid, C]``: the mean feature of each cell of a regular grid."""
    return F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2)


def dense_local_loss(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, across_batch: bool = False
) -> torch.Tensor:
    """NT-Xent over regions.

    Args:
        z1, z2: ``[B, R, d]`` L2-normalised region embeddings of the two views (region ``r`` of
            ``z1[i]`` and of ``z2[i]`` show the same anatomy).
        temperature: softmax temperature.
        across_batch: negatives are the regions of every slice of the batch, not only the
            anchor's own slice.

    Returns:
        The mean over all ``2 * B * R`` anchors of ``-log(exp(a.p/t) / sum_{o != a} exp(a.o/t))``,
        ``p`` the anchor's region in the other view, ``o`` every other region of the same slice
        (or, ``across_batch``, of the batch).
    """
    if across_batch:  # one "slice" holding every region of the batch
        z1, z2 = z1.reshape(1, -1, z1.shape[-1]), z2.reshape(1, -1, z2.shape[-1])
    b, r, _ = z1.shape
    z = torch.cat([z1, z2], dim=1)  # [B, 2R, d]
    logits = z @ z.transpose(1, 2) / temperature  # [B, 2R, 2R]
    eye = torch.eye(2 * r, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    target = torch.cat([torch.arange(r, 2 * r), torch.arange(0, r)]).to(z.device)
    return F.cross_entropy(logits.reshape(b * 2 * r, 2 * r), target.repeat(b))


def intensity_view(
    x: torch.Tensor, brightness: float = 0.1, contrast: float = 0.2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A spatially aligned second view: per-slice random contrast around the slice mean, then a
    random brightness shift (batched, on ``x``'s device)."""
    n = x.shape[0]
    shape = (n,) + (1,) * (x.ndim - 1)
    c = 1 + contrast * (2 * torch.rand(shape, generator=generator) - 1)
    s = brightness * (2 * torch.rand(shape, generator=generator) - 1)
    c, s = c.to(x), s.to(x)
    mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return (x - mean) * c + mean + s


def random_crop_warp(
    n: int,
    max_rotate_deg: float = 15.0,
    scale: tuple[float, float] = (0.6, 0.8),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[n, 2, 3]`` affine maps in ``affine_grid``'s normalised coordinates: output point ``p``
    samples the input at ``A p + t``, a rotated square window ``scale`` times the image's side,
    placed at random where it lies wholly inside the image (so no point samples padding)."""
    a = math.radians(min(abs(max_rotate_deg), 45.0))
    fits = 1 / (math.cos(a) + math.sin(a))  # the largest window that fits inside at every angle allowed
    if not 0 < scale[0] <= scale[1] <= fits:
        raise ValueError(
            f"crop scale must satisfy 0 < low <= high <= {fits:.3f} (for rotations up to "
            f"{max_rotate_deg} degrees), got {tuple(scale)}"
        )
    ang = torch.deg2rad(max_rotate_deg * (2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1))
    s = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=generator, dtype=torch.float64)
    cos, sin = torch.cos(ang) * s, torch.sin(ang) * s
    reach = cos.abs() + sin.abs()  # farthest |coordinate| a corner of the window reaches
    t = (1 - reach)[:, None] * (2 * torch.rand(n, 2, generator=generator, dtype=torch.float64) - 1)
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    return theta.float()


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample ``x`` ``[B, C, H, W]`` through ``theta`` ``[B, 2, 3]`` (bilinear). The coordinates are
    normalised, so the same ``theta`` maps an image and any feature map of it alike."""
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
