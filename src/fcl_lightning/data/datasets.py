"""Torch datasets for the three things training needs: partition-sampled pre-training batches,
labelled 2D slices for fine-tuning, and whole volumes for evaluation (plain ``list[Volume]``)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from monai.transforms import Compose
from torch.utils.data import Dataset, Sampler

from fcl_lightning.data.augment import apply_seeded
from fcl_lightning.data.volume import Volume
from fcl_lightning.fcl.partition import sample_partition_slices


class EpochKeySampler(Sampler[int]):
    """Shuffles ``n`` items anew each epoch and yields *keys* ``epoch * n + index``.

    Datasets derive each sample's randomness from its key, so every draw is a pure function of
    ``(seed, epoch, index)``: independent of workers and exactly reproducible after a resume.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, int(seed), shuffle, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        base = self.epoch * self.n
        self.epoch += 1
        return iter([base + i for i in order])


def _rng(seed: int, key: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % (2**32), int(key)])


class PartitionDataset(Dataset):
    """One item per volume: one random slice from each of the ``S`` partitions (FCL step 1).

    Item: ``image`` (and ``image_k``, an independently augmented view for the momentum encoder)
    ``[S, 1, H, W]``, ``partition`` ``[S]``, ``volume`` ``[S]`` (global volume id), ``client`` ``[S]``.
    Index with keys from :class:`EpochKeySampler`.
    """

    def __init__(
        self,
        volumes: list[Volume],
        volume_ids: list[int],
        client: int,
        num_partitions: int,
        augment: Compose | None = None,
        two_views: bool = True,
        seed: int = 0,
        emit_seeds: bool = False,
    ) -> None:
        for v in volumes:
            if v.num_slices < num_partitions:
                raise ValueError(f"{v.record.key}: {v.num_slices} slices, fewer than {num_partitions} partitions")
        self.volumes, self.volume_ids, self.client = volumes, volume_ids, client
        self.S, self.augment, self.two_views, self.seed = num_partitions, augment, two_views, seed
        self.emit_seeds = emit_seeds  # leave augmentation to the device (``aug_seed``, ``aug_seed_k``)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        idx = key % len(self.volumes)
        vol = self.volumes[idx]
        rng = _rng(self.seed, key)
        zs = sample_partition_slices(vol.num_slices, self.S, rng)
        slices = vol.image[..., torch.as_tensor(zs)].permute(3, 0, 1, 2)  # [S, 1, H, W]
        seeds = rng.integers(0, 2**31, size=(self.S, 2))
        q = [apply_seeded(self.augment, {"image": s}, seeds[i, 0])["image"] for i, s in enumerate(slices)]
        item = {"image": torch.stack(q)}
        if self.two_views:
            k = [apply_seeded(self.augment, {"image": s}, seeds[i, 1])["image"] for i, s in enumerate(slices)]
            item["image_k"] = torch.stack(k)
        if self.emit_seeds:
            item["aug_seed"] = torch.as_tensor(seeds[:, 0], dtype=torch.long)
            if self.two_views:
                item["aug_seed_k"] = torch.as_tensor(seeds[:, 1], dtype=torch.long)
        item["partition"] = torch.arange(self.S)
        item["volume"] = torch.full((self.S,), self.volume_ids[idx])
        item["client"] = torch.full((self.S,), self.client)
        return item


def collate_partitions(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack ``V`` partition items into a batch of ``V * S`` slices (volume-major order)."""
    return {k: torch.cat([it[k] for it in items]) for k in items[0]}


class LabelledSliceDataset(Dataset):
    """Every 2D slice of the labelled volumes, with fine-tuning augmentation applied jointly."""

    def __init__(
        self, volumes: list[Volume], augment: Compose | None = None, seed: int = 0, emit_seeds: bool = False
    ) -> None:
        for v in volumes:
            if v.label is None:
                raise ValueError(f"{v.record.key} has no label; fine-tuning needs labelled volumes")
        self.volumes, self.augment, self.seed = volumes, augment, seed
        self.emit_seeds = emit_seeds  # leave augmentation to the device (``aug_seed``)
        self.index = [(i, z) for i, v in enumerate(volumes) for z in range(v.num_slices)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        i, z = self.index[key % len(self.index)]
        v = self.volumes[i]
        sample = {"image": v.image[..., z], "label": v.label[..., z].float()}
        aug_seed = int(_rng(self.seed, key).integers(0, 2**31))
        if self.emit_seeds:
            return {
                "image": sample["image"].float(),
                "label": sample["label"].long(),
                "aug_seed": torch.tensor(aug_seed),
            }
        out = apply_seeded(self.augment, sample, aug_seed)
        return {"image": out["image"].float(), "label": out["label"].round().long()}


class SemiSupervisedSliceDataset(LabelledSliceDataset):
    """Labelled slices as :class:`LabelledSliceDataset`, each with ``ratio`` slices drawn from
    the client's unlabelled volumes: ``u_image`` ``[ratio, 1, H, W]`` (weakly augmented by
    ``weak_augment``, or left to the device) and ``u_seed`` ``[ratio]``, the seeds every later
    random draw on them derives from. Only the unlabelled volumes' images are kept: no label of
    theirs can reach a batch.
    """

    def __init__(
        self,
        volumes: list[Volume],
        unlabelled: list[Volume],
        ratio: int,
        augment: Compose | None = None,
        weak_augment: Compose | None = None,
        seed: int = 0,
        emit_seeds: bool = False,
    ) -> None:
        super().__init__(volumes, augment, seed, emit_seeds)
        if not unlabelled:
            raise ValueError("semi-supervised fine-tuning needs unlabelled volumes, and this client has none")
        self.u_images = [v.image for v in unlabelled]  # images only
        self.u_index = [(i, z) for i, im in enumerate(self.u_images) for z in range(im.shape[-1])]
        self.ratio, self.weak_augment = int(ratio), weak_augment

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(key)
        rng = np.random.default_rng([int(self.seed) % (2**32), int(key), 1])  # a stream of its own
        picks = rng.integers(0, len(self.u_index), size=self.ratio)
        seeds = rng.integers(0, 2**31, size=self.ratio)
        views = []
        for j, s in zip(picks.tolist(), seeds.tolist()):
            i, z = self.u_index[j]
            x = self.u_images[i][..., z]
            if not self.emit_seeds:
                x = apply_seeded(self.weak_augment, {"image": x}, s)["image"]
            views.append(x.float())
        item["u_image"] = torch.stack(views)
        item["u_seed"] = torch.as_tensor(seeds, dtype=torch.long)
        return item
