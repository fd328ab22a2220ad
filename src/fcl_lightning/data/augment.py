"""MONAI augmentation pipelines for 2D slices (dictionary transforms on ``[1, H, W]`` tensors).

Seeded per sample through :func:`apply_seeded`, so a sample's augmentation depends only on its
seed, not on the order in which workers visit samples; that is what makes runs resumable bit for bit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandScaleIntensityd,
    RandShiftIntensityd,
)


@dataclass
class AugmentConfig:
    """Strengths of the augmentations (probabilities are per transform).

    Attributes:
        prob: probability of each transform.
        brightness: max additive intensity shift (images are scaled to [0, 1]).
        contrast: max relative intensity scaling.
        gamma: gamma range half-width around 1.
        rotate_deg: max in-plane rotation.
        scale: max relative zoom.
        translate: max translation in pixels.
        elastic: apply elastic deformation (fine-tuning only).
    """

    prob: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.2
    gamma: float = 0.3
    rotate_deg: float = 10.0
    scale: float = 0.1
    translate: float = 8.0
    elastic: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"data.augment.prob must be in [0, 1], got {self.prob}")
        for name in ("brightness", "contrast", "gamma", "rotate_deg", "translate"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"data.augment.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.scale < 1.0:
            raise ValueError(f"data.augment.scale must be in [0, 1), got {self.scale}")


def intensity_transforms(keys: list[str], cfg: AugmentConfig) -> list:
    return [
        RandShiftIntensityd(keys, offsets=cfg.brightness, prob=cfg.prob),
        RandScaleIntensityd(keys, factors=cfg.contrast, prob=cfg.prob),
        RandAdjustContrastd(keys, gamma=(max(0.05, 1 - cfg.gamma), 1 + cfg.gamma), prob=cfg.prob),
    ]


def pretrain_augment(cfg: AugmentConfig | None = None) -> Compose:
    """Intensity (brightness, contrast, gamma) and a small affine, image only."""
    cfg = cfg or AugmentConfig()
    rot = np.deg2rad(cfg.rotate_deg)
    return Compose(
        [
            RandAffined(
                ["image"],
                prob=cfg.prob,
                rotate_range=rot,
                scale_range=cfg.scale,
                translate_range=cfg.translate,
                padding_mode="zeros",
                mode="bilinear",
            ),
            *intensity_transforms(["image"], cfg),
        ]
    )


def finetune_augment(cfg: AugmentConfig | None = None) -> Compose:
    """Affine and elastic on image and label (nearest for the label), then intensity on the image."""
    cfg = cfg or AugmentConfig()
    rot = np.deg2rad(cfg.rotate_deg)
    spatial = [
        RandAffined(
            ["image", "label"],
            prob=cfg.prob,
            rotate_range=rot,
            scale_range=cfg.scale,
            translate_range=cfg.translate,
            padding_mode="zeros",
            mode=["bilinear", "nearest"],
        ),
    ]
    if cfg.elastic:
        spatial.append(
            Rand2DElasticd(
                ["image", "label"],
                spacing=(24, 24),
                magnitude_range=(0.5, 1.5),
                prob=cfg.prob * 0.5,
                padding_mode="zeros",
                mode=["bilinear", "nearest"],
            )
        )
    return Compose([*spatial, *intensity_transforms(["image"], cfg)])


def apply_seeded(transform: Compose | None, sample: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Apply ``transform`` with its random state set from ``seed``; plain tensors come back."""
    if transform is None:
        return sample
    transform.set_random_state(seed=int(seed) % (2**32))
    out = transform(dict(sample))
    return {k: (v.as_tensor() if hasattr(v, "as_tensor") else v) for k, v in out.items()}


class BatchAugment:
    """The same augmentations on a whole batch, on the batch's device (``data.augment_on:
    device``): a random affine map (rotation, zoom, shift) through MONAI's batched spatial
    transformer (``AffineTransform``), a smooth random displacement (elastic, fine-tuning only)
    through MONAI's ``Warp``, and brightness, contrast and gamma as tensor arithmetic. Each
    sample's draws come from its own seed (``aug_seed`` in the batch, written by the dataset), so
    a batch is a pure function of its samples, as with the per-sample MONAI pipelines above; the
    draws differ from theirs (a different implementation of the same distributions).

    The elastic displacement: offsets drawn at control points every ``ELASTIC_SPACING`` pixels,
    normal with a standard deviation of ``ELASTIC_PIXELS`` x U(0.5, 1.5) pixels, upsampled
    bicubically to the image.
    """

    ELASTIC_SPACING = 24
    ELASTIC_PIXELS = 2.0

    def __init__(self, cfg: AugmentConfig | None = None, with_label: bool = False) -> None:
        from monai.networks.blocks import Warp
        from monai.networks.layers import AffineTransform

        self.cfg = cfg or AugmentConfig()
        self.with_label = with_label
        self.elastic = self.cfg.elastic and with_label  # as finetune_augment: elastic in fine-tuning only
        self.affine = {
            m: AffineTransform(normalized=True, mode=m, padding_mode="zeros") for m in ("bilinear", "nearest")
        }
        with warnings.catch_warnings():  # "Using PyTorch native grid_sample": what is wanted here
            warnings.simplefilter("ignore")
            self.warp = {m: Warp(mode=m, padding_mode="zeros") for m in ("bilinear", "nearest")}

    def params(self, seeds: torch.Tensor, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Every sample's draws (on the CPU, from its seed): what to apply and how strongly."""
        cfg, (h, w) = self.cfg, size
        n = len(seeds)
        out = {
            k: torch.zeros(n)
            for k in (
                "on_affine",
                "angle",
                "zoom",
                "dy",
                "dx",
                "on_elastic",
                "mag",
                "on_shift",
                "shift",
                "on_scale",
                "scale",
                "on_gamma",
                "gamma",
            )
        }
        ch, cw = h // self.ELASTIC_SPACING + 2, w // self.ELASTIC_SPACING + 2
        offsets = torch.zeros(n, 2, ch, cw)
        rot = np.deg2rad(cfg.rotate_deg)
        lo, hi = max(0.05, 1 - cfg.gamma), 1 + cfg.gamma
        for i, s in enumerate(seeds.tolist()):
            r = np.random.default_rng(int(s) % (2**63))
            u = r.random(13)
            vals = {
                "on_affine": u[0] < cfg.prob, "angle": (2 * u[1] - 1) * rot, "zoom": 1 + (2 * u[2] - 1) * cfg.scale,
                "dy": (2 * u[3] - 1) * cfg.translate * 2 / h, "dx": (2 * u[4] - 1) * cfg.translate * 2 / w,
                "on_elastic": u[5] < cfg.prob * 0.5, "mag": 0.5 + u[6],
                "on_shift": u[7] < cfg.prob, "shift": (2 * u[8] - 1) * cfg.brightness,
                "on_scale": u[9] < cfg.prob, "scale": (2 * u[10] - 1) * cfg.contrast,
                "on_gamma": u[11] < cfg.prob, "gamma": lo + u[12] * (hi - lo),
            }  # fmt: skip
            for k, v in vals.items():
                out[k][i] = float(v)
            if self.elastic:
                offsets[i] = torch.from_numpy(r.standard_normal((2, ch, cw))).float()
        out["offsets"] = offsets
        return out

    def __call__(
        self, image: torch.Tensor, seeds: torch.Tensor, label: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment ``image`` ``[B, 1, H, W]`` (and ``label`` ``[B, 1, H, W]``, spatially only, nearest)."""
        dev, (h, w) = image.device, tuple(image.shape[-2:])
        p = {k: v.to(dev) for k, v in self.params(seeds.cpu(), (h, w)).items()}
        # affine: zoom, rotation and shift where drawn, the identity elsewhere
        on = p["on_affine"]
        angle, zoom = p["angle"] * on, 1 + (p["zoom"] - 1) * on
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [torch.stack([cos, -sin, p["dy"] * on], 1), torch.stack([sin, cos, p["dx"] * on], 1)], 1
        )  # [B, 2, 3]
        image = self.affine["bilinear"](image, theta)
        if label is not None:
            label = self.affine["nearest"](label.float(), theta)
        if self.elastic:
            ddf = F.interpolate(p["offsets"], size=(h, w), mode="bicubic", align_corners=True)
            ddf = ddf * (self.ELASTIC_PIXELS * p["mag"] * p["on_elastic"]).view(-1, 1, 1, 1)
            image = self.warp["bilinear"](image, ddf)
            if label is not None:
                label = self.warp["nearest"](label, ddf)
        # intensity (images are scaled to [0, 1]): shift, scale, then gamma on the sample's range
        image = image + (p["shift"] * p["on_shift"]).view(-1, 1, 1, 1)
        image = image * (1 + p["scale"] * p["on_scale"]).view(-1, 1, 1, 1)
        lo = image.amin(dim=(1, 2, 3), keepdim=True)
        rng = image.amax(dim=(1, 2, 3), keepdim=True) - lo
        g = torch.where(p["on_gamma"] > 0, p["gamma"], torch.ones_like(p["gamma"])).view(-1, 1, 1, 1)
        image = torch.where(rng > 1e-7, ((image - lo) / (rng + 1e-7)).clamp(min=0) ** g * rng + lo, image)
        return image, (label.round().long() if label is not None else None)
