"""``fcl-lightning``: a LightningCLI whose ``fit`` runs the federated loop.

Sections: ``seed_everything``, ``model`` (a ``FederatedModule`` chosen by ``class_path``),
``data`` (the federated data module), ``trainer`` (the template of every client's Trainer) and
``federation`` (rounds, clients per round, aggregator, exchange, ...).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import Namespace, lazy_instance
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fcl_lightning import compat, layout
from fcl_lightning.console import output_console, printable_output
from fcl_lightning.data.datamodule import FederatedDataModule
from fcl_lightning.errors import ConfigError, as_config_error, debug_requested, run_reporting_errors
from fcl_lightning.federation.checkpoint import find_resume
from fcl_lightning.federation.config import Federation
from fcl_lightning.federation.evaluate import evaluate_run, run_predict
from fcl_lightning.federation.loop import FederatedLoop
from fcl_lightning.interrupt import stop_on_signals
from fcl_lightning.lit.base import FederatedModule
from fcl_lightning.lit.pretrain import ContrastivePretrainModule
from fcl_lightning.tracking import stale_log_version


def condense_parser_message(message: str) -> str:
    """jsonargparse's error text on one line: its first line and the reasons it lists, without
    the dumps of whole namespaces and the union members that did not apply."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return "invalid arguments"
    keep = []
    for ln in lines:
        if (
            ln.startswith(("Given value", "Subclass types expected", "Does not validate against any"))
            or "NoneType" in ln
            or ln == "Errors:"
        ):
            continue
        keep.append(ln.lstrip("- ").rstrip(":"))
    return ": ".join(dict.fromkeys(keep))[:600] or lines[0]


class FCLArgumentParser(LightningArgumentParser):
    """Parse errors end the command with one ``error:`` line (exit 2), not the whole usage."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or DEBUG:
            return super().error(message, ex)
        sys.stderr.write(f"error: {condense_parser_message(message)} (see: fcl-lightning fit --help)\n")
        self.exit(2)


#: set by ``--debug`` / ``FCL_DEBUG=1`` (:func:`console_main`): full tracebacks and parser errors
DEBUG = False


class FCLCLI(LightningCLI):
    """LightningCLI with a ``federation`` section; ``fit`` trains across clients."""

    #: what :meth:`before_instantiate_classes` filled in from the run's folder and checkpoint, which
    #: :meth:`portable_config` leaves out again: the whole default logger, or per WandbLogger its keys
    default_logger: bool = False
    filled_logger: dict[int, list[str]] = {}  # noqa: RUF012 (replaced per run, never mutated)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", FederatedModule)
        kwargs.setdefault("datamodule_class", FederatedDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("save_config_callback", None)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"description": __doc__})
        kwargs.setdefault("parser_class", FCLArgumentParser)
        argv = kwargs.get("args")
        argv = sys.argv[1:] if argv is None else argv
        named = argv[0] if isinstance(argv, list) and argv else None
        #: the subcommand the command line starts with: the only one whose parser is built
        self.only_subcommand = named if named in LightningCLI.subcommands() else None
        super().__init__(*args, **kwargs)

    def instantiate_classes(self) -> None:
        """Build the config's classes; a constructor's check that fails (``temperature -1``, weights
        that do not fit) surfaces as the one :class:`ConfigError` behind jsonargparse's wrapping."""
        try:
            super().instantiate_classes()
        except Exception as exc:
            user = as_config_error(exc)
            if user is None:
                raise
            raise user from exc

    def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]
        """``fit``, ``validate``, ``test`` and ``predict`` (label maps for new scans); only the one
        the command line starts with, where it names one. Lightning builds a parser for each
        subcommand listed here and searches them all on every parse, though a run uses one: the
        other three cost about 0.3 s a call (measured in-process on 2 cores). Top-level ``--help``
        and a misspelt name still get all four."""
        out = {k: set(v) for k, v in LightningCLI.subcommands().items()}
        out["predict"].add("return_predictions")
        only = getattr(self, "only_subcommand", None)
        return {only: out[only]} if only else out

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's subcommand parser; ``predict`` gains what it reads and writes."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        action = compat.parser_action(parser, "--weights_only")
        if action is not None:  # kept so that the config.yaml of earlier runs still parses
            action.help = "ignored: every checkpoint and weights file is loaded with weights_only=True"
        if subcommand == "predict":
            parser.add_argument(
                "--input",
                type=str | None,
                default=None,
                help="NIfTI images: a folder, a glob, a manifest (.csv/.tsv/.json) or an ACDC-layout root",
            )
            parser.add_argument(
                "--output",
                type=str | None,
                default=None,
                help="folder for <name>_seg.nii.gz, volumes.csv, indices.csv (default: <trainer.default_root_dir>/predictions)",
            )
            parser.add_argument("--client", type=int, default=0, help="local mode: whose model (default 0)")
            parser.add_argument("--probabilities", type=bool, default=False, help="also write <name>_prob.nii.gz")
            parser.add_argument(
                "--on_bad_scan",
                type=Literal["stop", "skip"],
                default="stop",
                help="a scan whose header is fine but whose voxels fail to decode: stop there, or skip it "
                "(volumes.csv's status column names it either way)",
            )
            compat.add_method_arguments(self, subcommand, ["input", "output", "client", "probabilities", "on_bad_scan"])
        if subcommand in ("test", "validate"):
            parser.add_argument(
                "--space",
                type=Literal["native", "preprocessed"],
                default="native",
                help="score on each scan's own grid (native, as ACDC and published tables do) or on the training grid",
            )
            compat.add_method_arguments(self, subcommand, ["space"])
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(Federation, "federation")
        parser.set_defaults({"model": lazy_instance(ContrastivePretrainModule)})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as Lightning does, then take ``ckpt_path`` out of the config into
        ``self.resume_path``: Lightning would load the file to read model hyper-parameters from
        it, but a federated checkpoint carries its resolved config instead, and ``fit`` / ``test``
        check the file themselves (one clear error for a bad one)."""
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        cfg = self.config.get(sub) if sub else None
        self.resume_path = cfg.get("ckpt_path") if cfg is not None else None
        if cfg is not None and "ckpt_path" in cfg:
            cfg.ckpt_path = None

    def before_instantiate_classes(self) -> None:
        """Default logger: a CSVLogger under ``default_root_dir``. A WandbLogger (``trainer.logger``)
        writes under ``default_root_dir`` too, and a ``fit --ckpt_path`` resume continues the wandb
        run whose id the checkpoint holds."""
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        if cfg is None:
            return
        root = cfg.trainer.default_root_dir or "."
        self.default_logger, self.filled_logger = False, {}
        self.resume = None  # fit: the checkpoint it resumes from, read once here for the whole run
        if self.subcommand == "fit" and self.resume_path:
            self.resume = find_resume(self.resume_path, root)
        resumed: dict[str, Any] = (self.resume.ckpt if self.resume else None) or {}
        if cfg.trainer.logger in (None, True):
            init = Namespace(save_dir=root, name=layout.LOGS)
            if resumed.get("csv_version") is not None:  # a resume goes on writing the same metrics.csv
                init.version = resumed["csv_version"]
            elif self.subcommand == "fit":
                stale = stale_log_version(root)
                if stale is not None:  # a run that left nothing to resume: its folder is reused
                    init.version = stale
            cfg.trainer.logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=init)
            self.default_logger = True
            return
        loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]
        for i, lg in enumerate(loggers):
            if not (isinstance(lg, Namespace) and str(lg.get("class_path", "")).endswith("WandbLogger")):
                continue
            init, filled = lg.init_args, []
            if init.get("save_dir") in (None, ".") and init.get("dir") is None:
                init.save_dir = root
                Path(root).mkdir(parents=True, exist_ok=True)
                filled.append("save_dir")
            rid = resumed.get("wandb_run_id")
            if rid and init.get("id") is None:
                init.id = rid
                init.resume = "allow"
                filled += ["id", "resume"]
            self.filled_logger[i] = filled

    def portable_config(self, sub: str | None = None) -> str:
        """The resolved config of ``sub`` as ``config.yaml`` and the checkpoints store it, minus what
        :meth:`before_instantiate_classes` filled in from this run's folder and checkpoint (the default
        CSV logger, a WandbLogger's ``save_dir``, the resumed wandb run id): ``fit --config
        <run>/config.yaml --trainer.default_root_dir <new>`` then logs under ``<new>``, not into the
        old run."""
        full = yaml.safe_load(self.parser.dump(self.config, skip_unset=False, skip_validation=True))  # parsed: valid
        section = full.get(sub, full) if sub else full
        if self.default_logger:
            section["trainer"]["logger"] = None
        elif self.filled_logger:
            lg = section["trainer"]["logger"]
            loggers = lg if isinstance(lg, list) else [lg]
            for i, keys in self.filled_logger.items():
                for k in keys:
                    loggers[i]["init_args"][k] = None
        return yaml.safe_dump(section, sort_keys=False)

    def fit(
        self,
        model: FederatedModule,
        datamodule: FederatedDataModule | None = None,
        ckpt_path: str | None = None,
        **_: Any,
    ) -> None:
        sub = self.subcommand or "fit"
        if datamodule is None:
            raise ConfigError("fcl-lightning fit needs a data section (data: ...)")
        config_text = self.portable_config(sub)
        root = Path(self.trainer.default_root_dir)
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
        loop.run(ckpt_path or getattr(self, "resume", None) or self.resume_path)

    def _evaluate(
        self,
        stage: str,
        model: FederatedModule,
        datamodule: FederatedDataModule | None,
        ckpt_path: str | None,
        space: str = "native",
    ) -> None:
        if datamodule is None:
            raise ConfigError(f"fcl-lightning {stage} needs a data section (data: ...)")
        evaluate_run(
            model,
            datamodule,
            ckpt_path,
            self.trainer.default_root_dir,
            stage,
            output_console(),
            device=self.trainer.strategy.root_device,
            space=space,
        )

    def test(
        self,
        model: FederatedModule,
        datamodule: FederatedDataModule | None = None,
        ckpt_path: str | None = None,
        space: str = "native",
        **_: Any,
    ) -> None:
        """Score the run's checkpoint on held-out volumes; writes ``test_per_patient.csv`` and ``test/*``."""
        self._evaluate("test", model, datamodule, ckpt_path or self.resume_path, space)

    def validate(
        self,
        model: FederatedModule,
        datamodule: FederatedDataModule | None = None,
        ckpt_path: str | None = None,
        space: str = "native",
        **_: Any,
    ) -> None:
        """Score the run's checkpoint on each client's validation patients (``val/*``)."""
        self._evaluate("val", model, datamodule, ckpt_path or self.resume_path, space)

    def predict(
        self,
        model: FederatedModule,
        datamodule: FederatedDataModule | None = None,
        ckpt_path: str | None = None,
        input: str | None = None,
        output: str | None = None,
        client: int = 0,
        probabilities: bool = False,
        on_bad_scan: str = "stop",
        **_: Any,
    ) -> None:
        """Segment new scans with a fine-tuning run's model: label maps in each scan's geometry."""
        run_predict(
            model, datamodule, ckpt_path or self.resume_path, input, output, client, probabilities,
            Path(self.trainer.default_root_dir), self.trainer.strategy.root_device, on_bad_scan,
        )  # fmt: skip


def build(args: list[str]) -> FCLCLI:
    """Parse and instantiate a config (model, data, trainer, federation) without running it: how
    the Flower apps read the same YAML files as ``fcl-lightning fit`` (shipped ones found as it does)."""

    with warnings.catch_warnings():  # the Flower processes have argv of their own; args are what count
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return FCLCLI(args=resolve_configs(args), run=False)


class _DropStartupNoise(logging.Filter):
    """Lightning's advertising and device lines ("GPU available: ...", "💡 Tip: ..."), printed by
    every Trainer the CLI builds; the device actually used is in the config and the round lines."""

    NOISE = ("💡 Tip", "GPU available:", "TPU available:", "HPU available:", "IPU available:")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


#: the example configs shipped in the package (the repository's configs/)
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_config(path: str) -> str:
    """``configs/<name>`` names a shipped example config when no such file is here (a wheel
    install, another working folder); any other path is the user's and is left alone."""
    p = Path(path)
    if p.exists() or p.is_absolute() or not p.parts or p.parts[0] != "configs":
        return path
    shipped = PACKAGED_CONFIGS.joinpath(*p.parts[1:])
    return str(shipped) if shipped.is_file() else path


def resolve_configs(args: list[str]) -> list[str]:
    """``--config configs/...`` / ``--config=configs/...`` arguments through :func:`packaged_config`."""
    out, prev = [], ""
    for a in args:
        if prev == "--config":
            a = packaged_config(a)
        elif a.startswith("--config="):
            a = "--config=" + packaged_config(a[len("--config=") :])
        out.append(a)
        prev = a
    return out


def check_config_files(args: list[str]) -> None:
    """Every ``--config`` file that exists parses as YAML, or one error naming the file and the
    line (jsonargparse would name ``<unicode string>``)."""
    prev = ""
    for a in args:
        path = a if prev == "--config" else a[len("--config=") :] if a.startswith("--config=") else None
        prev = a
        if path is None or not Path(path).is_file():
            continue
        try:
            yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None


def main(args: list[str] | None = None) -> None:
    """Run one command; errors propagate (what scripts and tests call)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not DEBUG:
        for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
            lg = logging.getLogger(name)
            if not any(isinstance(f, _DropStartupNoise) for f in lg.filters):
                lg.addFilter(_DropStartupNoise())
        # a resumed run, or one reusing the log folder of a run that left nothing to resume, writes
        # into an existing logs/version_N on purpose (continue_csv_logs keeps the rows it should)
        warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists and is not empty.*")
        # "Received SIGTERM: 15" from every client Trainer: the stop is reported once, by the loop
        logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").setLevel(logging.WARNING)
    if args is None:
        sys.argv[1:] = resolve_configs(sys.argv[1:])
    check_config_files(sys.argv[1:] if args is None else resolve_configs(args))
    FCLCLI(args=resolve_configs(args) if args is not None else None)


def console_main(argv: list[str] | None = None) -> None:
    """The ``fcl-lightning`` command: bad input ends it with one ``error:`` line and exit 2, an
    internal error with exit 1, SIGTERM / Ctrl-C with where the run stopped and exit 143 / 130;
    ``--debug`` or ``FCL_DEBUG=1`` prints the tracebacks."""
    global DEBUG
    printable_output()
    with stop_on_signals():
        if argv is None:  # LightningCLI reads sys.argv itself (given args too, it warns)
            DEBUG, rest = debug_requested(sys.argv[1:])
            sys.argv[1:] = rest
            run_reporting_errors(lambda: main(None), DEBUG)
        else:
            DEBUG, rest = debug_requested(list(argv))
            run_reporting_errors(lambda: main(rest), DEBUG)


if __name__ == "__main__":  # pragma: no cover
    console_main()
