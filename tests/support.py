"""Helpers the test modules share (test modules never import one another): the repository's
root and the tiny fine-tuning command line most fine-tuning tests start from."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: a two-client phantom fine-tuning at 32 px that a CPU runs in seconds
FINETUNE = [
    "--config",
    str(REPO / "configs" / "demo_finetune.yaml"),
    "--trainer.accelerator=cpu",
    "--model.features=[8,16,16,16]",
    "--data.img_size=32",
    "--data.spacing=3.0",
    "--data.augment_on=device",  # batched: the per-sample MONAI pipelines dominate a tiny run
    "--data.source.num_subjects=8",
    "--data.source.size=64",
    "--data.source.num_sites=2",
    "--data.test_source.num_subjects=2",
    "--data.test_source.size=64",
    "--data.num_clients=2",
    "--federation.local_steps=5",
    "--federation.rounds=1",
]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``fcl-lightning ARGV`` in-process as a user types it: exit code, stdout, stderr."""
    from fcl_lightning.cli import console_main

    with pytest.raises(SystemExit) as ex:
        console_main([str(a) for a in argv])
        raise SystemExit(0)
    out = capsys.readouterr()
    return ex.value.code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def bare_trainer(max_steps: int, **kwargs):
    """A CPU Trainer for ``max_steps`` optimiser steps with no logger, checkpoints, progress bar
    or summary: what the tests that drive a module directly fit with."""
    import lightning.pytorch as pl

    return pl.Trainer(
        max_steps=max_steps, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", **kwargs,
    )  # fmt: skip
