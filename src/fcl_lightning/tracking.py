"""Experiment tracking on top of Lightning's loggers: the resolved config, the run summary,
media, and the wandb run id that lets ``--ckpt_path last`` continue the same wandb run.

The federation owns the loggers (one run per ``fit``, not one per client or round); the
per-client Trainers run with ``logger=False``. Everything here is a no-op for loggers that lack
the feature, so CSV-only runs pay nothing, and nothing here touches the network itself: wandb
decides that from ``WANDB_MODE`` (online, offline, disabled).
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from fcl_lightning import compat, layout


def wandb_loggers(loggers: Iterable[Logger]) -> list[WandbLogger]:
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def wandb_run_id(loggers: Iterable[Logger]) -> str | None:
    """The id of the wandb run these loggers write to (``None`` without a WandbLogger or when
    wandb is disabled)."""
    for lg in wandb_loggers(loggers):
        run = lg.experiment
        rid = getattr(run, "id", None)
        if isinstance(rid, str) and rid and not getattr(run, "disabled", False):
            return rid
    return None


def csv_version(loggers: Iterable[Logger]) -> int | str | None:
    """The version (``logs/version_N``) of the run's CSVLogger; a resume writes to it again."""
    return next((lg.version for lg in loggers if isinstance(lg, CSVLogger)), None)


def stale_log_version(root: str | Path) -> int | None:
    """The latest ``logs/version_N`` of a run folder that holds no checkpoint to resume from (a run
    killed before its first checkpoint): a new run there reuses that version rather than writing
    ``version_N+1`` beside a stale one. ``None`` when there is a checkpoint or no log folder."""
    root = Path(root)
    if layout.last(root).exists():
        return None
    versions = [
        int(p.name.split("_", 1)[1])
        for p in (root / layout.LOGS).glob("version_*")
        if p.is_dir() and p.name.split("_", 1)[1].isdigit()
    ]
    return max(versions) if versions else None


def csv_value(text: str) -> int | float:
    """A value read back from ``metrics.csv``: integers stay integers (``round``, counts)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def continue_csv_logs(loggers: Iterable[Logger], done: int) -> int:
    """On resume, keep the rows of a CSVLogger's ``metrics.csv`` up to round ``done`` (what the
    checkpoint holds) and go on appending to the same file: after any number of kills it has one
    row per round. (Lightning's CSV writer deletes an existing file when it starts; the rows are
    read first and written back.) Returns the number of rows kept."""
    kept = 0
    for lg in loggers:
        if not isinstance(lg, CSVLogger):
            continue
        path = Path(lg.log_dir) / "metrics.csv"
        rows = []
        if path.is_file():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("step") not in (None, "") and float(r["step"]) <= done]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists and is not empty.*")
            writer = lg.experiment  # removes the old file
        for r in rows:
            step = int(float(r.pop("step")))
            writer.log_metrics({k: csv_value(v) for k, v in r.items() if v not in (None, "")}, step=step)
        lg.save()
        kept += len(rows)
    return kept


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}`` (wandb summaries and tables want flat keys)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def log_config(loggers: Iterable[Logger], config_text: str) -> None:
    """Every logger records the resolved config (CSV: ``hparams.yaml``; wandb: the run config)."""
    if not config_text:
        return
    cfg = yaml.safe_load(config_text) or {}
    for lg in loggers:
        lg.log_hyperparams(cfg)


def log_summary(loggers: Iterable[Logger], summary: Mapping[str, Any]) -> None:
    """Copy ``summary.json``'s figures into the wandb run summary."""
    flat = {k: v for k, v in flatten(summary).items() if isinstance(v, (int, float, str, bool))}
    for lg in wandb_loggers(loggers):
        lg.experiment.summary.update(flat)


def log_images(loggers: Iterable[Logger], images: Mapping[str, Path], step: int | None = None) -> None:
    """Log existing PNG files as wandb images (key -> path); missing files are skipped."""
    for key, path in images.items():
        if Path(path).is_file():
            for lg in wandb_loggers(loggers):
                lg.log_image(key=key, images=[str(path)], step=step)


def per_client_dice_rows(metrics: Mapping[str, float], round_idx: int) -> list[list[Any]]:
    """Rows ``[round, client, source, dice_mean]`` from one round's metrics: the clients' own
    validation Dice (``client{c}/val/dice_mean``) and the downstream evaluation's per-client Dice
    (``downstream/{init}/client{c}/dice_mean``)."""
    rows = []
    for key, value in sorted(metrics.items()):
        parts = key.split("/")
        if len(parts) == 3 and parts[0].startswith("client") and parts[1:] == ["val", "dice_mean"]:
            rows.append([round_idx, int(parts[0][6:]), "val", float(value)])
        elif len(parts) == 4 and parts[0] == "downstream" and parts[2].startswith("client") and parts[3] == "dice_mean":
            rows.append([round_idx, int(parts[2][6:]), f"downstream/{parts[1]}", float(value)])
    return rows


def log_dice_table(loggers: Iterable[Logger], rows: list[list[Any]], step: int | None = None) -> None:
    """The per-round, per-client Dice table (all rows so far) as a wandb table."""
    if not rows:
        return
    for lg in wandb_loggers(loggers):
        lg.log_table(key="per_client_dice", columns=["round", "client", "source", "dice_mean"], data=rows, step=step)


def finish(loggers: Iterable[Logger]) -> None:
    """Close the wandb run at the end of a fit (one run per fit; a later fit in the same process,
    e.g. a resume, starts or continues a run of its own instead of writing into this one)."""
    for lg in wandb_loggers(loggers):
        compat.close_wandb_run(lg)  # never creates a run just to close it
