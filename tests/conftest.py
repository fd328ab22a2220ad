import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")


TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture
def experiment():
    """``experiment(name)``: ``experiments/<name>.py`` as a module (the scripts are not a package)."""
    return load_experiment


def load_experiment(name: str):
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


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


@pytest.fixture(scope="session")
def consortium(tmp_path_factory):
    """A partially labelled phantom consortium (``write_consortium``): 3 site folders (ACDC
    layout, ACDC layout in another axis order, a manifest with empty label cells), each a
    different scanner spacing, 6 patients per site of which the last 2 by id keep their labels."""
    from fcl_lightning.data.phantom import write_consortium

    return write_consortium(tmp_path_factory.mktemp("consortium"), num_sites=3, patients_per_site=6, size=64)


@pytest.fixture
def cli(capsys):
    """``cli(argv)``: ``fcl-lightning ARGV`` in-process as a user types it: exit code, stdout, stderr."""
    from support import run_cli

    return lambda argv: run_cli(argv, capsys)
