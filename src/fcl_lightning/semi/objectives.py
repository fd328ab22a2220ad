"""Semi-supervised fine-tuning plug-ins (``model.init_args.semi_supervised``, by ``class_path``).

Each plug-in takes the labelled batch and the client's own unlabelled slices (weakly augmented,
never with a label) and returns the supervised and the unlabelled loss; the segmentation module
adds them as ``sup + weight * ramp(step) * unsup``. What a plug-in holds (the mean teacher) is
the client's own state: kept with the client across rounds, never averaged by the server.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from scipy import ndimage
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


class EMATeacher(SemiSupervised):
    """A plug-in with a teacher: an EMA of the student (the project's momentum update,
    ``min(1 - 1 / (step + 1), decay)`` as SSL4MIS), the client's own state next to its student.

    In local fine-tuning the teacher follows that client's student; in federated fine-tuning the
    server averages the students only, and each client's teacher keeps averaging its student,
    which restarts from the global weights every round (sending teachers too would double what
    leaves a site). ``model.scored: teacher`` scores the teacher instead of the student.
    """

    def __init__(self, ratio: int = 1, weight: float = 0.1, rampup_steps: int = 0, decay: float = 0.99) -> None:
        super().__init__(ratio, weight, rampup_steps)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"{type(self).__name__} needs decay in [0, 1], got {decay}")
        self.decay = decay
        self.teacher: nn.Module | None = None

    def attach(self, net: nn.Module) -> None:
        self.teacher = make_momentum_copy(net)

    def reset(self, net: nn.Module) -> None:
        with torch.no_grad():
            for t, s in zip(self.teacher.state_dict().values(), net.state_dict().values(), strict=True):
                t.copy_(s)

    def after_step(self, net: nn.Module, step: int) -> None:
        update_momentum(net, self.teacher, min(1.0 - 1.0 / (step + 1), self.decay))


class MeanTeacher(EMATeacher):
    """Mean teacher (Tarvainen & Valpola 2017; SSL4MIS's ACDC recipe): the EMA teacher predicts
    the unlabelled slices from a noised input; the student's softmax is pulled to the teacher's
    (mean squared error).

    Args:
        decay: EMA coefficient (``min(1 - 1 / (step + 1), decay)``, as SSL4MIS).
        noise: standard deviation of the Gaussian noise on the teacher's input (clipped at 2x).
    """

    def __init__(
        self, ratio: int = 1, weight: float = 0.1, rampup_steps: int = 0, decay: float = 0.99, noise: float = 0.1
    ) -> None:
        super().__init__(ratio, weight, rampup_steps, decay)
        if noise < 0:
            raise ValueError(f"MeanTeacher needs noise >= 0, got {noise}")
        self.noise = noise

    def forward(self, net, sup_loss, image, label, u_image, u_seed):  # noqa: D102 (see the base)
        b = image.shape[0]
        logits = net(torch.cat([image, u_image]))
        g = generator_for(u_seed, 2)
        noise = (torch.randn(u_image.shape, generator=g) * self.noise).clamp(-2 * self.noise, 2 * self.noise)
        with torch.no_grad():
            target = torch.softmax(self.teacher(u_image + noise.to(u_image.device)), 1)
        unsup = torch.mean((torch.softmax(logits[b:], 1) - target) ** 2)
        return {"sup": sup_loss(logits[:b], label), "unsup": unsup}


def largest_components(label: np.ndarray) -> np.ndarray:
    """``label`` ``[B, H, W]`` with each foreground class reduced to its largest 8-connected
    component (BCP's ``get_ACDC_2DLargestCC``; scipy's labelling: MONAI's
    ``KeepLargestConnectedComponent`` needs scikit-image, which the project does not install)."""
    out = np.zeros_like(label)
    eight = np.ones((3, 3), dtype=bool)
    for i, sl in enumerate(label):
        for k in np.unique(sl[sl > 0]):
            comp, n = ndimage.label(sl == k, structure=eight)
            sizes = np.bincount(comp.ravel())[1:]
            out[i][comp == 1 + int(np.argmax(sizes))] = k
    return out


def region_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCP's per-region loss: ``(masked Dice + masked cross-entropy) / 2`` of ``logits``
    ``[B, C, H, W]`` against hard labels ``target`` ``[B, H, W]`` on the pixels where ``mask`` is 1
    (cross-entropy averaged over those pixels, as BCP's ``mix_loss``)."""
    ce = F.cross_entropy(logits, target.long(), reduction="none")
    ce = (ce * mask).sum() / (mask.sum() + 1e-16)
    return 0.5 * (masked_dice(torch.softmax(logits, 1), target, mask) + ce)


class BCP(EMATeacher):
    """Bidirectional copy-paste (Bai et al., CVPR 2023; BCP's ACDC recipe): a box of a labelled
    slice is pasted into an unlabelled one and the same box of an unlabelled slice into a labelled
    one; the student learns each mixed slice from the ground truth where it shows the labelled
    slice and from the EMA teacher's pseudo-label (argmax, each structure's largest connected
    component) where it shows the unlabelled one.
    ``sup`` is the loss on the labelled regions, ``unsup`` on the pseudo-labelled ones, so
    ``sup + weight * unsup`` is BCP's loss with its ``u_weight`` 0.5 as ``weight`` (up to BCP's
    factor 1/2 on the whole). The unmixed labelled slices are not trained on, as in BCP.

    The box is ``box_fraction`` of each side (BCP: 2/3) at a random place, one per batch as BCP's
    ``generate_mask``. Pairs, by ``pairing``:

    - ``each`` (the default, what the plateau tables ran): every labelled slice is pasted both
      ways, ``2B`` mixed slices from ``B`` labelled and ``2B`` unlabelled (``ratio: 2``):
      labelled slice ``i`` with unlabelled slice ``i`` (labelled box in the unlabelled slice) and
      with unlabelled slice ``B + i`` (or ``i + 1`` when the batch has fewer than ``2B``:
      unlabelled box in the labelled slice).
    - ``halves`` (BCP's ACDC code): the labelled and the unlabelled batch are split in halves
      ``a`` and ``b``; labelled ``a`` boxes go into unlabelled ``a``, unlabelled ``b`` boxes into
      labelled ``b``: ``B`` mixed slices from ``B`` of each (``ratio: 1``), half as many
      slices through the teacher and the student a step.

    Args:
        decay: the teacher's EMA coefficient (BCP: 0.99).
        box_fraction: the pasted box's side as a fraction of the image's.
        largest_component: keep each structure's largest connected component of the pseudo-label.
        pairing: ``each`` or ``halves``, above.
    """

    def __init__(
        self,
        ratio: int = 2,
        weight: float = 0.5,
        rampup_steps: int = 0,
        decay: float = 0.99,
        box_fraction: float = 2 / 3,
        largest_component: bool = True,
        pairing: Literal["each", "halves"] = "each",
    ) -> None:
        super().__init__(ratio, weight, rampup_steps, decay)
        if not 0.0 < box_fraction < 1.0:
            raise ValueError(f"BCP box_fraction must be in (0, 1), got {box_fraction}")
        if pairing not in ("each", "halves"):
            raise ValueError(f"BCP pairing must be 'each' or 'halves', got {pairing!r}")
        if pairing == "halves" and ratio != 1:
            raise ValueError(
                f"BCP pairing 'halves' mixes B labelled with B unlabelled slices: set ratio: 1 (got {ratio}), "
                "or the extra unlabelled slices are loaded and never used"
            )
        self.box_fraction, self.largest_component = float(box_fraction), bool(largest_component)
        self.pairing = pairing

    def box(self, size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
        """``[H, W]``: 1 inside the pasted box (``box_fraction`` of each side, at a random place)."""
        h, w = size
        bh, bw = int(h * self.box_fraction), int(w * self.box_fraction)
        y0 = int(torch.randint(0, h - bh + 1, (1,), generator=g))
        x0 = int(torch.randint(0, w - bw + 1, (1,), generator=g))
        out = torch.zeros(h, w)
        out[y0 : y0 + bh, x0 : x0 + bw] = 1
        return out

    @torch.no_grad()
    def pseudo_label(self, u: torch.Tensor) -> torch.Tensor:
        """The teacher's hard label of ``u`` ``[U, 1, H, W]``, cleaned to each structure's largest
        connected component."""
        pseudo = self.teacher(u).argmax(1)
        if not self.largest_component:
            return pseudo
        return torch.from_numpy(largest_components(pseudo.cpu().numpy())).to(u.device)

    def forward(self, net, sup_loss, image, label, u_image, u_seed):  # noqa: D102 (see the base)
        b = image.shape[0]
        lab = label.squeeze(1) if label.dim() == 4 else label
        u = u_image[:b] if u_image.shape[0] >= b else u_image.repeat((b // u_image.shape[0] + 1, 1, 1, 1))[:b]
        if self.pairing == "halves":
            if b < 2:
                raise ValueError("BCP pairing 'halves' needs a labelled batch of at least 2 slices (data.batch_size)")
            h = b // 2  # labelled a, b = image[:h], image[h:]; unlabelled a, b = u[:h], u[h:]
            l_a, l_b, y_a, y_b, u_a, u_b = image[:h], image[h:], lab[:h], lab[h:], u[:h], u[h:]
        else:
            l_a, l_b, y_a, y_b = image, image.roll(1, 0), lab, lab.roll(1, 0)
            u_a, u_b = u, (u_image[b : 2 * b] if u_image.shape[0] >= 2 * b else u.roll(1, 0))
        n_a = u_a.shape[0]
        pseudo = self.pseudo_label(torch.cat([u_a, u_b]))
        p_a, p_b = pseudo[:n_a], pseudo[n_a:]
        m = self.box(tuple(image.shape[-2:]), generator_for(u_seed, 3)).to(image.device)
        into_u = u_a * (1 - m) + l_a * m  # a labelled box inside an unlabelled slice
        into_l = l_b * (1 - m) + u_b * m  # an unlabelled box inside a labelled slice
        logits = net(torch.cat([into_u, into_l]))
        # One mask per slice: region_loss divides by the mask's own sum, so a broadcast [H, W] would not do.
        n_b = pseudo.shape[0] - n_a
        in_a, out_a = m.expand(n_a, *m.shape), (1 - m).expand(n_a, *m.shape)
        in_b, out_b = m.expand(n_b, *m.shape), (1 - m).expand(n_b, *m.shape)
        sup = 0.5 * (region_loss(logits[:n_a], y_a, in_a) + region_loss(logits[n_a:], y_b, out_b))
        unsup = 0.5 * (region_loss(logits[:n_a], p_a, out_a) + region_loss(logits[n_a:], p_b, in_b))
        return {"sup": sup, "unsup": unsup}
