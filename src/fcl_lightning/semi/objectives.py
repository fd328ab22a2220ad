"""Semi-supervised fine-tuning plug-ins (``model.init_args.semi_supervised``, by ``class_path``).

Each plug-in takes the labelled batch and the client's own unlabelled slices (weakly augmented,
never with a label) and returns the supervised and the unlabelled loss; the segmentation module
adds them as ``sup + weight * ramp(step) * unsup``. What a plug-in holds (the mean teacher) is
the client's own state: kept with the client across rounds, never averaged by the server.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from torch import nn

from fcl_lightning.fcl.momentum import make_momentum_copy, update_momentum
from fcl_lightning.models.unet import decode_skips
from fcl_lightning.semi.perturb import cutmix, cutmix_boxes, feature_dropout, generator_for, intensity_jitter


def sigmoid_rampup(step: float, length: float) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = step / length`` clipped to [0, 1] (Laine & Aila; the
    mean teacher's and SSL4MIS's ramp); 1 when ``length`` is 0."""
    if length <= 0:
        return 1.0
    t = min(max(float(step), 0.0), float(length)) / float(length)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


class SemiSupervised(nn.Module):
    """Base of the plug-ins.

    Args:
        ratio: unlabelled slices per labelled slice in a batch (a batch of ``data.batch_size``
            labelled slices carries ``ratio * batch_size`` unlabelled ones).
        weight: weight of the unlabelled loss at the end of the ramp.
        rampup_steps: the weight ramps up over this many optimiser steps of the client's
            fine-tuning (sigmoid ramp; 0: full weight from the first step).
    """

    def __init__(self, ratio: int = 1, weight: float = 1.0, rampup_steps: int = 0) -> None:
        super().__init__()
        if ratio < 1:
            raise ValueError(f"semi_supervised ratio must be >= 1 unlabelled slice per labelled one, got {ratio}")
        if weight < 0 or rampup_steps < 0:
            raise ValueError(f"semi_supervised weight and rampup_steps must be >= 0, got {weight}, {rampup_steps}")
        self.ratio, self.weight, self.rampup_steps = int(ratio), float(weight), int(rampup_steps)

    def weight_at(self, step: float) -> float:
        """The unlabelled loss's weight after ``step`` optimiser steps."""
        return self.weight * sigmoid_rampup(step, self.rampup_steps)

    def ramp_warning(self, client_steps: int | None) -> str | None:
        """What to say when a client's ``client_steps`` end before the weight's ramp does."""
        if client_steps is None or client_steps >= self.rampup_steps:
            return None
        return (
            f"semi_supervised.rampup_steps is {self.rampup_steps} but a client trains {client_steps} steps: "
            f"its unlabelled weight ends at {self.weight_at(client_steps):.4g} of {self.weight:g} "
            "(lower rampup_steps or train longer)"
        )

    def attach(self, net: nn.Module) -> None:
        """Build what the plug-in keeps beside the student ``net`` (called once)."""

    def reset(self, net: nn.Module) -> None:
        """A fresh client: derive the plug-in's state from the student's current weights."""

    def after_step(self, net: nn.Module, step: int) -> None:
        """After every optimiser step (``step`` counts from 0)."""

    def forward(
        self,
        net: nn.Module,
        sup_loss: nn.Module,
        image: torch.Tensor,
        label: torch.Tensor,
        u_image: torch.Tensor,
        u_seed: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``sup`` and ``unsup`` losses (and monitors) of one batch: ``image``/``label`` the
        labelled slices ``[B, 1, H, W]``, ``u_image`` the weakly augmented unlabelled slices
        ``[U, 1, H, W]`` with their seeds ``u_seed`` ``[U]`` (what every random draw derives from)."""
        raise NotImplementedError


def masked_dice(prob: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dice loss of probabilities ``prob`` ``[B, C, H, W]`` against hard labels ``target``
    ``[B, H, W]`` on the pixels where ``mask`` ``[B, H, W]`` is 1, classes pooled over the batch
    (UniMatch's ``DiceLoss`` with ``ignore``): MONAI's ``MaskedDiceLoss`` on a one-hot target
    (masking an index map would turn ignored pixels into background)."""
    onehot = F.one_hot(target.long(), prob.shape[1]).permute(0, 3, 1, 2).to(prob.dtype)
    return MaskedDiceLoss(batch=True)(prob, onehot, mask.unsqueeze(1).to(prob.dtype))


class UniMatch(SemiSupervised):
    """Weak-to-strong consistency (FixMatch; UniMatch, Yang et al. CVPR 2023): the student's own
    prediction on the weak view, where its confidence reaches ``threshold``, is the pseudo-label
    of ``strong_views`` strongly perturbed views (intensity jitter, blur, CutMix) and of the weak
    view decoded from dropped-out encoder features (``fp_dropout``); masked Dice on each.
    As UniMatch: ``unsup = 0.5 * mean(strong views) + 0.5 * feature view`` (just the strong
    views when ``fp_dropout`` is 0). CutMix pastes a box of another slice of the same batch (the
    batch rolled by one) with its pseudo-label, which spares UniMatch's second unlabelled batch.

    Args:
        threshold: confidence (max softmax) a pixel's pseudo-label needs (UniMatch's ACDC: 0.95).
        strong_views: 1 (FixMatch) or 2 (UniMatch's dual streams).
        fp_dropout: channel dropout of the feature-perturbed view (0.5; 0 turns it off).
        cutmix_prob: probability of the strong view's CutMix.
        jitter_prob: probability of the strong view's colour jitter.
        blur_prob: probability of the strong view's blur.
    """

    def __init__(
        self,
        ratio: int = 1,
        weight: float = 1.0,
        rampup_steps: int = 0,
        threshold: float = 0.95,
        strong_views: int = 2,
        fp_dropout: float = 0.5,
        cutmix_prob: float = 0.5,
        jitter_prob: float = 0.8,
        blur_prob: float = 0.5,
    ) -> None:
        super().__init__(ratio, weight, rampup_steps)
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"UniMatch threshold must be in [0, 1), got {threshold}")
        if strong_views < 1 or not 0.0 <= fp_dropout < 1.0:
            raise ValueError(
                f"UniMatch needs strong_views >= 1 and fp_dropout in [0, 1), got {strong_views}, {fp_dropout}"
            )
        self.threshold, self.strong_views, self.fp_dropout = threshold, int(strong_views), fp_dropout
        self.cutmix_prob, self.jitter_prob, self.blur_prob = cutmix_prob, jitter_prob, blur_prob

    def strong_view(
        self, u: torch.Tensor, conf: torch.Tensor, pseudo: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One strongly perturbed view of the weak batch ``u`` with its pseudo-label and confidence."""
        x = intensity_jitter(u, g, prob=self.jitter_prob, blur_prob=self.blur_prob)
        box = cutmix_boxes(u.shape[0], tuple(u.shape[-2:]), g, prob=self.cutmix_prob).to(u.device)
        x = cutmix(x, box, x.roll(1, 0))
        inside = box > 0
        return x, torch.where(inside, pseudo.roll(1, 0), pseudo), torch.where(inside, conf.roll(1, 0), conf)

    def forward(self, net, sup_loss, image, label, u_image, u_seed):  # noqa: D102 (see the base)
        b, u = image.shape[0], u_image.shape[0]
        skips = net.encoder(torch.cat([image, u_image]))
        if self.fp_dropout > 0:  # the weak view again, from dropped-out features: one decoder pass
            fp = feature_dropout([s[b:] for s in skips], self.fp_dropout)
            skips = [torch.cat([s, f]) for s, f in zip(skips, fp)]
        logits = net.final_conv(decode_skips(net.decoder, skips))
        sup = sup_loss(logits[:b], label)
        with torch.no_grad():
            conf, pseudo = torch.softmax(logits[b : b + u].detach(), 1).max(1)
        g = generator_for(u_seed, 1)
        views = [self.strong_view(u_image, conf, pseudo, g) for _ in range(self.strong_views)]
        probs = torch.softmax(net(torch.cat([v[0] for v in views])), 1).split(u)
        strong = torch.stack(
            [masked_dice(p, t, (c >= self.threshold).float()) for p, (_, t, c) in zip(probs, views)]
        ).mean()
        out = {"sup": sup, "unsup_strong": strong, "mask_ratio": (conf >= self.threshold).float().mean()}
        if self.fp_dropout > 0:
            out["unsup_fp"] = masked_dice(torch.softmax(logits[b + u :], 1), pseudo, (conf >= self.threshold).float())
            out["unsup"] = 0.5 * strong + 0.5 * out["unsup_fp"]
        else:
            out["unsup"] = strong
        return out


class MeanTeacher(SemiSupervised):
    """Mean teacher (Tarvainen & Valpola 2017; SSL4MIS's ACDC recipe): an EMA of the student
    (the project's momentum update) predicts the unlabelled slices from a noised input; the
    student's softmax is pulled to the teacher's (mean squared error).

    The teacher is the client's own state, next to its student: in local fine-tuning it follows
    that client's student; in federated fine-tuning the server averages the students only, and
    each client's teacher keeps averaging its student, which restarts from the global weights
    every round (sending teachers too would double what leaves a site for a model nobody scores).

    Args:
        decay: EMA coefficient (``min(1 - 1 / (step + 1), decay)``, as SSL4MIS).
        noise: standard deviation of the Gaussian noise on the teacher's input (clipped at 2x).
    """

    def __init__(
        self, ratio: int = 1, weight: float = 0.1, rampup_steps: int = 0, decay: float = 0.99, noise: float = 0.1
    ) -> None:
        super().__init__(ratio, weight, rampup_steps)
        if not 0.0 <= decay <= 1.0 or noise < 0:
            raise ValueError(f"MeanTeacher needs decay in [0, 1] and noise >= 0, got {decay}, {noise}")
        self.decay, self.noise = decay, noise
        self.teacher: nn.Module | None = None

    def attach(self, net: nn.Module) -> None:
        self.teacher = make_momentum_copy(net)

    def reset(self, net: nn.Module) -> None:
        with torch.no_grad():
            for t, s in zip(self.teacher.state_dict().values(), net.state_dict().values(), strict=True):
                t.copy_(s)

    def after_step(self, net: nn.Module, step: int) -> None:
        update_momentum(net, self.teacher, min(1.0 - 1.0 / (step + 1), self.decay))

    def forward(self, net, sup_loss, image, label, u_image, u_seed):  # noqa: D102 (see the base)
        b = image.shape[0]
        logits = net(torch.cat([image, u_image]))
        g = generator_for(u_seed, 2)
        noise = (torch.randn(u_image.shape, generator=g) * self.noise).clamp(-2 * self.noise, 2 * self.noise)
        with torch.no_grad():
            target = torch.softmax(self.teacher(u_image + noise.to(u_image.device)), 1)
        unsup = torch.mean((torch.softmax(logits[b:], 1) - target) ** 2)
        return {"sup": sup_loss(logits[:b], label), "unsup": unsup}
