"""On-device batch augmentation (``data.augment_on: device``): a pure function of each sample's
seed, image and label moved together, the identity when nothing is drawn, and a federated run
that uses it is reproducible."""

from __future__ import annotations

import pytest
import torch

from fcl_lightning.cli import main
from fcl_lightning.data.augment import AugmentConfig, BatchAugment


def blobs(n: int = 6, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    label = torch.zeros(n, 1, size, size, dtype=torch.long)
    for i in range(n):
        for c, (cy, cx, r) in enumerate(((20, 18, 8), (28, 30, 6), (14, 32, 5)), start=1):
            label[i, 0][(yy - cy - i) ** 2 + (xx - cx) ** 2 < r**2] = c
    return label.float() / 3, label


def test_a_batch_is_a_function_of_its_seeds():
    image, label = blobs()
    aug = BatchAugment(AugmentConfig(prob=1.0), with_label=True)
    seeds = torch.arange(6) * 7919
    a, la = aug(image, seeds, label)
    b, lb = aug(image, seeds, label)
    assert torch.equal(a, b) and torch.equal(la, lb)
    c, _ = aug(image, seeds + 1, label)
    assert not torch.allclose(a, c)
    # a sample's result does not depend on its batch neighbours
    d, ld = aug(image[2:3], seeds[2:3], label[2:3])
    assert torch.allclose(d, a[2:3], atol=1e-6) and torch.equal(ld, la[2:3])


def test_spatial_transforms_move_image_and_label_together():
    image, label = blobs()
    cfg = AugmentConfig(prob=1.0, brightness=0.0, contrast=0.0, gamma=0.0, rotate_deg=20, scale=0.15, translate=6)
    img, lab = BatchAugment(cfg, with_label=True)(image, torch.arange(6) + 11, label)
    assert not torch.equal(lab, label)  # something moved
    agree = ((img * 3).round().long() == lab).float().mean()
    assert agree > 0.97, agree  # bilinear image vs nearest label differ only on edges
    assert set(lab.unique().tolist()) <= {0, 1, 2, 3}


def test_nothing_drawn_is_the_identity():
    image, label = blobs()
    img, lab = BatchAugment(AugmentConfig(prob=0.0), with_label=True)(image, torch.arange(6), label)
    assert torch.allclose(img, image, atol=1e-5) and torch.equal(lab, label)


@pytest.mark.slow  # the suite's tiny runs augment on the device, and its resume test checks them bit for bit
def test_a_federated_run_with_device_augmentation_is_reproducible(tmp_path, tiny):
    def encoder(run: str, *extra: str) -> dict[str, torch.Tensor]:
        main(tiny(tmp_path / run, rounds=1, extra=list(extra)))
        return torch.load(tmp_path / run / "encoder.pt", weights_only=True)

    a = encoder("a", "--data.augment_on=device")
    b = encoder("b", "--data.augment_on=device")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_volumes_on_device_are_moved_once_and_batches_are_built_there():
    """``data.volumes_on: device``: ``place`` moves every volume; the loaders then slice and stack
    on that device (the meta device stands in for a GPU: any CPU copy would show as ``cpu``)."""
    from fcl_lightning.data.datamodule import FederatedDataModule
    from fcl_lightning.data.phantom import PhantomSource

    d = FederatedDataModule(
        source=PhantomSource(num_subjects=2, size=64),
        num_clients=1,
        val_fraction=0.5,
        img_size=32,
        volumes_per_batch=2,
        augment_on="device",
        volumes_on="device",
    )
    d.setup("fit")
    ref = next(iter(d.pretrain_loader(0, seed=3)))
    d.volumes_on = "cpu"
    d.place("meta")  # volumes_on: cpu leaves them where they are
    assert d.train[0][0].image.device.type == "cpu"
    d.volumes_on = "device"
    d.place("meta")
    vols = [v for vs in (*d.train, *d.val) for v in vs]
    assert len(vols) == 4 and all(v.image.device.type == "meta" and v.label.device.type == "meta" for v in vols)
    batch = next(iter(d.pretrain_loader(0, seed=3)))
    assert batch["image"].device.type == "meta" and batch["image_k"].device.type == "meta"
    assert batch["image"].shape == ref["image"].shape and torch.equal(batch["partition"], ref["partition"])
    labelled = next(iter(d.finetune_loader(0, seed=3)))
    assert labelled["image"].device.type == "meta" and labelled["label"].device.type == "meta"
    with pytest.raises(ValueError, match="num_workers=0"):
        FederatedDataModule(volumes_on="device", num_workers=2)
