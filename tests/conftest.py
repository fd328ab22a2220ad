import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")


def tiny_args(root, rounds=2, clients=2, extra=()):
    """A seconds-long pre-training run on a tiny phantom (small encoder, 32 px, batched augmentation:
    the per-sample MONAI pipelines took half of a tiny run's time)."""
    return [
        "fit",
        f"--trainer.default_root_dir={root}",
        "--trainer.accelerator=cpu",
        f"--data.num_clients={clients}",
        "--data.source.num_subjects=8",
        "--data.source.size=64",
        "--data.img_size=32",
        "--data.volumes_per_batch=2",
        "--data.augment_on=device",
        "--model.features=[8,16,16,16]",
        "--model.proj_hidden=32",
        "--model.proj_dim=16",
        "--model.objective.num_negatives=32",
        f"--federation.rounds={rounds}",
        *extra,
    ]


@pytest.fixture
def tiny():
    return tiny_args


@pytest.fixture(scope="module")
def pretrained_tiny(tmp_path_factory):
    """One tiny pre-training run (1 round, seed 0) that tests read, not change."""
    from fcl_lightning.cli import main

    root = tmp_path_factory.mktemp("pretrained")
    main(tiny_args(root, rounds=1, extra=["--seed_everything=0"]))
    return root
