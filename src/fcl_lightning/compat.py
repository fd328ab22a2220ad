"""The one place that touches Lightning's (and argparse's) private members, so that a Lightning
release that moves them breaks here, with a message, and in ``tests/test_compat.py``, not deep in a
run. Each function says what it needs and why no public API does it."""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

#: the Lightning versions these were checked against (``tests/test_compat.py`` runs the checks)
CHECKED = "2.6"


def restart_epochs(trainer: pl.Trainer) -> None:
    """Make a reused Trainer start its next fit at epoch 0, as a new Trainer would (past epoch 0
    Lightning makes the loader's iterator twice). No public API resets the fit loop's progress."""
    progress = trainer.fit_loop.epoch_progress
    progress.total.reset()
    progress.current.reset()


def extend_max_steps(trainer: pl.Trainer, steps: int) -> None:
    """Give a reused Trainer ``steps`` more optimiser steps (``max_steps`` is read-only on the
    Trainer; the epoch loop holds the live value)."""
    trainer.fit_loop.epoch_loop.max_steps = trainer.global_step + steps


def add_method_arguments(cli: LightningCLI, subcommand: str, names: list[str]) -> None:
    """Hand the parser arguments ``names`` of ``subcommand`` to the CLI's method (``predict``'s
    ``--input``): LightningCLI passes on only those it found in the method's signature."""
    cli._subcommand_method_arguments[subcommand] += names


def parser_action(parser: argparse.ArgumentParser, option: str) -> argparse.Action | None:
    """The action of ``option`` (e.g. ``--weights_only``, to change its help text)."""
    return parser._option_string_actions.get(option)


def close_wandb_run(logger: Any) -> None:
    """Finish a WandbLogger's run if it started one, without starting one (its ``experiment``
    property would create the run), so that a later fit in the process gets a run of its own."""
    if logger._experiment is not None:
        logger._experiment.finish()
        logger._experiment = None


def check() -> list[str]:
    """What of the above the installed Lightning lacks (empty: all there)."""
    import inspect

    from lightning.pytorch.loggers import WandbLogger

    missing = []
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    progress = getattr(trainer.fit_loop, "epoch_progress", None)
    if progress is None or not all(hasattr(getattr(progress, p, None), "reset") for p in ("total", "current")):
        missing.append("Trainer.fit_loop.epoch_progress.{total,current}.reset")
    if not hasattr(getattr(trainer.fit_loop, "epoch_loop", None), "max_steps"):
        missing.append("Trainer.fit_loop.epoch_loop.max_steps")
    if not hasattr(LightningCLI, "_prepare_subcommand_parser"):
        missing.append("LightningCLI._prepare_subcommand_parser")
    if "self._subcommand_method_arguments[" not in inspect.getsource(LightningCLI):
        missing.append("LightningCLI._subcommand_method_arguments")
    if not hasattr(argparse.ArgumentParser(), "_option_string_actions"):
        missing.append("argparse.ArgumentParser._option_string_actions")
    if "self._experiment = " not in inspect.getsource(WandbLogger):
        missing.append("WandbLogger._experiment")
    return missing
