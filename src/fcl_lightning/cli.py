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
from fcl_lightning.federation.checkpoint import atomic_write_text, load_checkpoint, resolve_ckpt_path
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
        """Default logger: a CSVLogger under ``default_root_dir``. A WandbLogger (``trainer.logger``)
        writes under ``default_root_dir`` too, and a ``fit --ckpt_path`` resume continues the wandb
        run whose id the checkpoint holds."""
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        if cfg is None:
            return
        root = cfg.trainer.default_root_dir or "."
        if cfg.trainer.logger in (None, True):
            cfg.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=root, name="logs")
            )
            return
        loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]
        for lg in loggers:
            if not (isinstance(lg, Namespace) and str(lg.get("class_path", "")).endswith("WandbLogger")):
                continue
            init = lg.init_args
            if init.get("save_dir") in (None, ".") and init.get("dir") is None:
                init.save_dir = root
                Path(root).mkdir(parents=True, exist_ok=True)
            if self.subcommand == "fit" and cfg.get("ckpt_path") and init.get("id") is None:
                path = resolve_ckpt_path(cfg.ckpt_path, root)
                rid = load_checkpoint(path).get("wandb_run_id") if path is not None else None
                if rid:
                    init.id = rid
                    init.resume = "allow"

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


def build(args: list[str]) -> FCLCLI:
    """Parse and instantiate a config (model, data, trainer, federation) without running it: how
    the Flower apps read the same YAML files as ``fcl-lightning fit``."""
    import warnings

    with warnings.catch_warnings():  # the Flower processes have argv of their own; args are what count
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return FCLCLI(args=args, run=False)


def main(args: list[str] | None = None) -> None:
    """Console entry point."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    FCLCLI(args=args)


if __name__ == "__main__":  # pragma: no cover
    main()
