"""Strong perturbations of unlabelled batches, on the batch's device (UniMatch's recipe for
ACDC): intensity jitter, Gaussian blur, CutMix boxes, and dropout on encoder features.

Every draw comes from a CPU ``torch.Generator`` seeded from the slices' own seeds
(:func:`generator_for`), so a perturbed batch is a pure function of its samples: runs resume bit
for bit and do not depend on the device's random stream. Written by hand: MONAI's random
intensity transforms work per sample on the CPU, and no library has CutMix for segmentation
batches with its pseudo-labels; the blur itself is MONAI's ``GaussianFilter``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter


def generator_for(seeds: torch.Tensor, stream: int) -> torch.Generator:
    """A CPU generator determined by the batch's slice seeds and a stream number."""
    state = np.random.SeedSequence([int(s) for s in seeds.flatten().tolist()] + [int(stream)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def intensity_jitter(
    x: torch.Tensor,
    g: torch.Generator,
    prob: float = 0.8,
    brightness: float = 0.5,
    contrast: float = 0.5,
    blur_prob: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
) -> torch.Tensor:
    """Per sample: with ``prob``, brightness x U(1 +- brightness) and contrast around the sample's
    mean x U(1 +- contrast) (torchvision's ColorJitter on a grey image); then, with ``blur_prob``,
    a Gaussian blur of sigma U(blur_sigma) pixels. ``x``: ``[B, 1, H, W]`` in [0, 1]."""
    b = x.shape[0]
    on = (torch.rand(b, generator=g) < prob).float()
    bf = 1 + (2 * torch.rand(b, generator=g) - 1) * brightness * on
    cf = 1 + (2 * torch.rand(b, generator=g) - 1) * contrast * on
    blur = torch.rand(b, generator=g) < blur_prob
    sigma = blur_sigma[0] + torch.rand(b, generator=g) * (blur_sigma[1] - blur_sigma[0])
    bf, cf = bf.to(x.device).view(-1, 1, 1, 1), cf.to(x.device).view(-1, 1, 1, 1)
    x = (x * bf).clamp(0, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * cf + mean).clamp(0, 1)
    if blur.any():
        x = x.clone()
        for i in torch.nonzero(blur).flatten().tolist():
            x[i : i + 1] = GaussianFilter(2, float(sigma[i])).to(x.device)(x[i : i + 1])
    return x


def cutmix_boxes(
    b: int,
    size: tuple[int, int],
    g: torch.Generator,
    prob: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """``[B, H, W]`` masks (1 inside a random box, UniMatch's ``obtain_cutmix_box``): with
    ``prob`` per sample a box of U(area) of the image and aspect U(ratio), at a random place."""
    h, w = size
    out = torch.zeros(b, h, w)
    for i in range(b):
        on, a, r, py, px = torch.rand(5, generator=g).tolist()
        if on >= prob:
            continue
        s = (area[0] + a * (area[1] - area[0])) * h * w
        asp = ratio[0] + r * (ratio[1] - ratio[0])
        bh, bw = min(h, max(1, int(round((s / asp) ** 0.5)))), min(w, max(1, int(round((s * asp) ** 0.5))))
        y0, x0 = int(py * (h - bh + 1)), int(px * (w - bw + 1))
        out[i, y0 : y0 + bh, x0 : x0 + bw] = 1
    return out


def cutmix(x: torch.Tensor, box: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``x`` with ``source`` pasted inside ``box`` (``[B, H, W]``, broadcast over channels)."""
    m = box.to(x.device, x.dtype).unsqueeze(1) if x.dim() == 4 else box.to(x.device, x.dtype)
    return x * (1 - m) + source * m


def feature_dropout(skips: list[torch.Tensor], p: float) -> list[torch.Tensor]:
    """UniMatch's feature perturbation: channel dropout (``Dropout2d``) on every encoder level."""
    return [F.dropout2d(s, p, training=True) for s in skips]
