"""MONAI augmentation pipelines for 2D slices (dictionary transforms on ``[1, H, W]`` tensors).

Seeded per sample through :func:`apply_seeded`, so a sample's augmentation depends only on its
seed, not on the order in which workers visit samples; that is what makes runs resumable bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
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
