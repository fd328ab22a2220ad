"""The Gaussian mechanism on what a client sends: L2 clipping, then noise of standard deviation
``sigma = z * sensitivity`` (``z``: the noise multiplier the accountant composes).

Sensitivities are for *replace-one* neighbours (one patient's, or one slice's, data swapped for
anyone else's; the count of what is sent does not change): a clipped vector moves by at most
``2 C`` in L2. A patient sends at most one vector per partition and round
(:func:`one_per_patient`), so its vectors together move by at most ``2 C sqrt(S)``; a clipped
weight update moves by at most ``2 C_w``. The noise comes from a generator seeded by a secret only
the client holds (:func:`secret`), kept in its state so that a resumed run repeats it: the run's
seed is in the config everyone shares, and noise anyone can regenerate protects nothing."""

from __future__ import annotations

import math
import secrets as _secrets
from collections.abc import Callable, Sequence

import torch

from fcl_lightning.fcl.memory_bank import BankEntries
from fcl_lightning.fcl.partition import volume_slices


def clip_rows(vectors: torch.Tensor, clip: float) -> torch.Tensor:
    """Each row scaled down to L2 norm at most ``clip`` (rows inside the ball are unchanged)."""
    norms = vectors.norm(dim=1, keepdim=True)
    return vectors * torch.clamp(clip / norms.clamp_min(1e-12), max=1.0)


def gaussian(shape: Sequence[int], sigma: float, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """``N(0, sigma^2)`` noise on the CPU from ``generator``."""
    return torch.randn(*shape, generator=generator, dtype=dtype) * sigma


def vector_sensitivity(clip: float, unit: str, num_partitions: int) -> float:
    """L2 sensitivity of one round's exchanged vectors to one ``unit`` (``patient``: up to one
    vector per partition, ``slice``: one vector)."""
    if unit == "patient":
        return 2.0 * clip * math.sqrt(num_partitions)
    if unit == "slice":
        return 2.0 * clip
    raise ValueError(f"privacy unit must be 'patient' or 'slice', got {unit!r}")


def one_per_patient(
    partitions: torch.Tensor,
    patients: torch.Tensor,
    num_partitions: int,
    per_partition: int | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """Indices of the slices to share: in every partition, at most ``per_partition`` patients
    drawn at random (``None``: all), one random slice of each (either frame); ascending."""
    keep = []
    for s in range(num_partitions):
        idx = torch.nonzero(partitions == s).flatten()
        who = torch.unique(patients[idx])
        who = who[torch.randperm(len(who), generator=generator)]
        if per_partition is not None:
            who = who[:per_partition]
        for p in who.sort().values.tolist():
            mine = idx[patients[idx] == p]
            keep.append(mine[torch.randint(len(mine), (1,), generator=generator)])
    return torch.cat(keep).sort().values if keep else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def private_features(
    embed: Callable[[torch.Tensor], torch.Tensor],
    volumes: Sequence[torch.Tensor],
    patients: Sequence[str],
    num_partitions: int,
    client: int,
    per_partition: int | None,
    clip: float,
    sigma: float,
    sample_generator: torch.Generator,
    noise_generator: torch.Generator,
    batch_size: int = 64,
) -> BankEntries:
    """What a client shares with DP on: one slice per patient and partition (at most
    ``per_partition`` patients each), embedded by ``embed``, clipped to ``clip`` and noised with
    ``sigma``. The vectors are sent as noised (not renormalised); receivers normalise them."""
    if not volumes:
        raise ValueError(f"client {client} has no volumes to embed")
    x, p = volume_slices(volumes, num_partitions)
    ids = {name: i for i, name in enumerate(sorted(set(patients)))}
    who = torch.cat([torch.full((v.shape[-1],), ids[name], dtype=torch.long) for v, name in zip(volumes, patients)])
    order = one_per_patient(p, who, num_partitions, per_partition, sample_generator)
    x, p = x[order.to(x.device)], p[order]
    vecs = torch.cat([embed(x[i : i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)])
    vecs = clip_rows(vecs, clip)
    vecs = vecs + gaussian(vecs.shape, sigma, noise_generator)
    return BankEntries(vecs, p, torch.full_like(p, client))


def update_norm(update: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """L2 norm of ``update - start`` over the floating-point tensors (weights and float buffers)."""
    sq = sum(
        float((update[k].double() - start[k].double()).pow(2).sum()) for k in update if update[k].is_floating_point()
    )
    return math.sqrt(sq)


#: the smallest running variance a noised BatchNorm buffer keeps
VAR_FLOOR = 1e-3


def private_update(
    update: dict[str, torch.Tensor],
    start: dict[str, torch.Tensor],
    clip: float,
    sigma: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """``start + clip(update - start) + N(0, sigma^2)`` on every floating-point tensor (the
    weights and the float buffers, e.g. BatchNorm statistics, which are data too); integer
    buffers (step counts) pass unchanged. Noised running variances are floored at
    ``VAR_FLOOR`` (post-processing: no privacy cost), as a negative one turns batch norm to NaN."""
    scale = min(1.0, clip / max(update_norm(update, start), 1e-12))
    out = {}
    for k, v in update.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        delta = (v.double() - start[k].double()) * scale
        noised = start[k].double() + delta + gaussian(v.shape, sigma, generator, torch.float64)
        if k.endswith("running_var"):
            noised = noised.clamp_min(VAR_FLOOR)
        out[k] = noised.to(v.dtype)
    return out


def secret() -> int:
    """A fresh secret seed for a client's noise (from the OS's entropy)."""
    return _secrets.randbits(62)


def noise_generator(secret_seed: int, round_idx: int, stream: int) -> torch.Generator:
    """The client's noise for one round and release (``stream`` 0: vectors, 1: weights)."""
    return torch.Generator().manual_seed((secret_seed * 1_000_003 + round_idx * 101 + stream) % (2**63 - 1))
