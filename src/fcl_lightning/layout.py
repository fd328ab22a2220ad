"""The run folder's layout: every name in it, in one place, importing nothing of the package.

::

    <root>/
      config.yaml               the run's config, written before the first round
      run.lock                  held by the fit that writes here (federation/lock.py)
      summary.json              the run's figures (test/* and val/* added by test / validate)
      encoder.pt                pre-training: the encoder it learnt (FedAvg)
      encoder_init.pt           pre-training: the weights it started from (the paired random init)
      encoders/client<c>.pt     local pre-training: each client's encoder
      checkpoints/round-NNN.ckpt, last.ckpt   the server's round files (last: a link to the newest)
      clients/client<c>/state-NNN.pt          each in-process client's own state
      logs/version_<k>/         Lightning's CSV logger (a resume writes a new version)
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG = "config.yaml"
LOCK = "run.lock"
SUMMARY = "summary.json"
ENCODER = "encoder.pt"
INIT_ENCODER = "encoder_init.pt"
ENCODERS = "encoders"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
CLIENTS = "clients"
LOGS = "logs"
ROUND_FILE = re.compile(r"round-(\d+)\.ckpt")
STATE_FILE = re.compile(r"state-(\d+)\.pt")


def checkpoints(root: str | Path) -> Path:
    """``<root>/checkpoints``."""
    return Path(root) / CHECKPOINTS


def last(root: str | Path) -> Path:
    """``<root>/checkpoints/last.ckpt``, what ``--ckpt_path last`` names."""
    return checkpoints(root) / LAST


def round_file(root: str | Path, done: int) -> Path:
    """The server's file after ``done`` rounds: ``<root>/checkpoints/round-NNN.ckpt``."""
    return checkpoints(root) / f"round-{int(done):03d}.ckpt"


def client_dir(root: str | Path, client: int) -> Path:
    """Where an in-process client's states go: ``<root>/clients/client<c>``."""
    return Path(root) / CLIENTS / f"client{int(client)}"


def state_file(folder: str | Path, version: int) -> Path:
    """A client's state after ``version`` rounds, in its folder: ``state-NNN.pt``."""
    return Path(folder) / f"state-{int(version):03d}.pt"


def client_encoder(root: str | Path, client: int) -> Path:
    """Local pre-training's encoder of ``client``: ``<root>/encoders/client<c>.pt``."""
    return Path(root) / ENCODERS / f"client{int(client)}.pt"
