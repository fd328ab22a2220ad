import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")


TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def tiny_args(root, rounds=2, clients=2, extra=()):
    """A seconds-long pre-training run on a tiny phantom (``configs/tiny.yaml``: small encoder,
    32 px, batched augmentation; the per-sample MONAI pipelines took half of a tiny run's time)."""
    return [
        "fit",
        "--config",
        str(TINY_CONFIG),
        f"--trainer.default_root_dir={root}",
        f"--data.num_clients={clients}",
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
