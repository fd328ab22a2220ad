"""``fcl-lightning``: a LightningCLI whose ``fit`` runs the federated loop.

Sections: ``seed_everything``, ``model`` (a ``FederatedModule`` chosen by ``class_path``),
``data`` (the federated data module), ``trainer`` (the template of every client's Trainer) and
``federation`` (rounds, clients per round, aggregator, exchange, ...).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from jsonargparse import Namespace, lazy_instance
from rich.console import Console
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fcl_lightning.data.datamodule import FederatedDataModule
from fcl_lightning.federation.checkpoint import atomic_write_text
from fcl_lightning.federation.config import Federation
from fcl_lightning.federation.evaluate import evaluate_run
from fcl_lightning.federation.loop import FederatedLoop
from fcl_lightning.lit.base import FederatedModule
from fcl_lightning.lit.pretrain import ContrastivePretrainModule


class FCLCLI(LightningCLI):
    """LightningCLI with a ``federation`` section; ``fit`` trains across clients."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", FederatedModule)
        kwargs.setdefault("datamodule_class", FederatedDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("save_config_callback", None)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"description": __doc__})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(Federation, "federation")
        parser.set_defaults({"model": lazy_instance(ContrastivePretrainModule)})

    def _parse_ckpt_path(self) -> None:
        """Lightning would read model hyper-parameters from ``ckpt_path`` here; a federated
        checkpoint carries its resolved config instead, and ``fit`` validates the file itself."""

    def before_instantiate_classes(self) -> None:
        """Default logger: a CSVLogger under ``default_root_dir`` (wandb etc. via ``trainer.logger``)."""
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        if cfg is None or cfg.trainer.logger not in (None, True):
            return
        root = cfg.trainer.default_root_dir or "."
        cfg.trainer.logger = Namespace(
            class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=root, name="logs")
        )

    def fit(self, model: FederatedModule, datamodule: FederatedDataModule | None = None,
            ckpt_path: str | None = None, **_: Any) -> None:
        sub = self.subcommand or "fit"
        if datamodule is None:
            raise ValueError("fcl-lightning fit needs a data section (data: ...)")
        config_text = self._parser(sub).dump(self.config[sub], skip_none=False)
        root = Path(self.trainer.default_root_dir)
        atomic_write_text(config_text, root / "config.yaml")
        loop = FederatedLoop(
            federation=self.config_init[sub]["federation"],
            module=model,
            datamodule=datamodule,
            trainer_kwargs={**self.config_init[sub]["trainer"]},
            root_dir=root,
            loggers=self.trainer.loggers,
            seed=int(self.config[sub].get("seed_everything") or 0),
            config_text=config_text,
        )
        loop.run(ckpt_path)


    def _evaluate(self, stage: str, model: FederatedModule, datamodule: FederatedDataModule | None,
                  ckpt_path: str | None) -> None:
        if datamodule is None:
            raise ValueError(f"fcl-lightning {stage} needs a data section (data: ...)")
        evaluate_run(model, datamodule, ckpt_path, self.trainer.default_root_dir, stage, Console(stderr=True),
                     device=self.trainer.strategy.root_device)

    def test(self, model: FederatedModule, datamodule: FederatedDataModule | None = None,
             ckpt_path: str | None = None, **_: Any) -> None:
        """Score the run's checkpoint on held-out volumes; writes ``test_per_patient.csv`` and ``test/*``."""
        self._evaluate("test", model, datamodule, ckpt_path)

    def validate(self, model: FederatedModule, datamodule: FederatedDataModule | None = None,
                 ckpt_path: str | None = None, **_: Any) -> None:
        """Score the run's checkpoint on each client's validation patients (``val/*``)."""
        self._evaluate("val", model, datamodule, ckpt_path)


def main(args: list[str] | None = None) -> None:
    """Console entry point."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    FCLCLI(args=args)


if __name__ == "__main__":  # pragma: no cover
    main()
