"""The run's state, its one home: what the round engine carries from round to round
(:class:`RunState`), what a round hook sees of a run (:class:`RunContext`, :class:`RoundHook`) and
of its data (:class:`FederatedData`), the server's round checkpoint made from it and read back
(:meth:`RunState.checkpoint`, :meth:`RunState.from_checkpoint`) and checked against a config
(:func:`check_checkpoint`), each client's own state in files beside it (:class:`ClientStateFiles`),
and which round files stay on disk (:class:`CheckpointKeep`, :func:`retention`).

The server's checkpoint holds the global weights, the exchanged features in flight and the
bookkeeping; a client's momentum nets, memory bank, optimiser moments and teacher are saved by
the client (in-process: ``<root>/clients/client<c>/state-NNN.pt``; on Flower: the node's
``state-dir``), as ``state-NNN.pt`` with NNN the rounds done when it was saved. The server's
checkpoint records, per client, which file holds its state (``client_versions``).

**Commit.** A round's client files are renamed into place before the round's server file, and
a client file is only ever read through a server file that names it. A process killed at any
point leaves either both (the round is committed) or a server file of an earlier round, which
names only earlier client files; a newer client file is then never read, and redoing the round
writes it again with the same bits. (Files are renamed into place atomically, so a kill leaves
whole files; surviving a power loss as well would need fsyncs, which no file here pays for.)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from fcl_lightning import layout
from fcl_lightning.fcl.memory_bank import BankEntries
from fcl_lightning.federation.checkpoint import CheckpointError
from fcl_lightning.io import atomic_save, safe_torch_load
from fcl_lightning.tracking import per_client_dice_rows

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger
    from rich.console import Console

    from fcl_lightning.lit.base import FederatedModule

FORMAT = "fcl-lightning/federated-v2"  # v2: client states in their own files (federation/state.py)
READABLE_FORMATS = ("fcl-lightning/federated-v1", FORMAT)
CLIENT_FORMAT = "fcl-lightning/client-state-v2"


def bank_to_dict(entries: BankEntries | None) -> dict[str, torch.Tensor] | None:
    return None if entries is None else {k: v.detach().cpu() for k, v in entries._asdict().items()}


def bank_from_dict(d: dict[str, torch.Tensor] | None) -> BankEntries | None:
    return None if d is None else BankEntries(d["vectors"], d["partitions"], d["clients"])


def rng_state() -> dict[str, Any]:
    """Global RNG states in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))


def resolve_ckpt_path(ckpt_path: str | None, root: str | Path, missing_last_ok: bool = False) -> Path | None:
    """``None`` -> no resume; ``last`` -> ``<root>/checkpoints/last.ckpt``; else the path given.
    ``missing_last_ok``: ``last`` with no such file is ``None`` too (``fit`` then starts the run,
    so that a retry loop can always pass ``--ckpt_path last``)."""
    if ckpt_path is None:
        return None
    path = layout.last(root) if ckpt_path == "last" else Path(ckpt_path)
    if missing_last_ok and ckpt_path == "last" and not path.exists():
        return None
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (ckpt_path={ckpt_path!r})")
    return path


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a federated round checkpoint with ``weights_only=True`` and check its format
    (``mmap``: tensors are read only when used)."""
    ckpt = safe_torch_load(path, "checkpoint", CheckpointError, mmap=mmap)
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path} is not an fcl-lightning federated checkpoint (expected format {FORMAT!r})")
    return ckpt


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a ``fit`` resumes from, resolved and read once for the whole run: the CLI
    reads the loggers' ids from it, the loop the run's state (``path`` and ``ckpt`` ``None``:
    nothing to resume; ``requested``: what ``--ckpt_path`` said)."""

    requested: str | None
    path: Path | None
    ckpt: dict[str, Any] | None


def find_resume(ckpt_path: str | None, root: str | Path) -> ResumePoint:
    """Resolve ``ckpt_path`` against the run folder ``root`` (``last`` with nothing there: nothing
    to resume) and read the checkpoint (:func:`load_checkpoint`)."""
    path = resolve_ckpt_path(ckpt_path, root, missing_last_ok=True)
    return ResumePoint(ckpt_path, path, load_checkpoint(path) if path is not None else None)


@dataclass
class CheckpointKeep:
    """Which ``round-NNN.ckpt`` files stay on disk (``last.ckpt`` and the final round's always do).

    Args:
        last: the newest this many round files are kept whole: the run resumes from any of them
            (``None``: every round file, with every client state it names).
        every: older round files are kept when their round is a multiple of this, as the global
            weights of that round (what ``METHOD@R`` cells, ``model.pretrained`` and ``test``
            read); their client states are not kept, so a run does not resume from them
            (``None``: no older round file is kept).
    """

    last: int | None = 2
    every: int | None = 10

    def __post_init__(self) -> None:
        for name in ("last", "every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"federation.checkpoint_keep.{name} must be >= 1 or null, got {value}")


def retention(rounds: list[int], keep: CheckpointKeep, final: int) -> tuple[set[int], set[int]]:
    """Of the round files ``rounds`` on disk: (kept whole, kept as weights only); the others go.
    ``final``: the run's last round (its file is always kept whole)."""
    rounds = sorted(rounds)
    whole = set(rounds if keep.last is None else rounds[-keep.last :]) | ({final} & set(rounds))
    weights = {r for r in rounds if r not in whole and keep.every is not None and r % keep.every == 0}
    return whole, weights


class ClientStateFiles:
    """One client's saved states in ``folder``: ``state-NNN.pt``, NNN the rounds done when it was
    saved (its *version*). Written atomically, loaded with ``weights_only=True``."""

    def __init__(self, folder: str | Path, client: int) -> None:
        self.folder, self.client = Path(folder), int(client)

    def path(self, version: int) -> Path:
        return layout.state_file(self.folder, version)

    def versions(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := layout.STATE_FILE.fullmatch(p.name)))

    def save(self, version: int, state: Any, save: Callable[[Any, Path], Any] | None = None) -> Path:
        record = {"format": CLIENT_FORMAT, "client": self.client, "round": int(version), "state": state}
        return (save or save_checkpoint_file)(record, self.path(version))

    def load(self, version: int) -> Any:
        path = self.path(version)
        saved = safe_torch_load(path, f"client {self.client}'s state", CheckpointError)
        if not isinstance(saved, dict) or saved.get("format") != CLIENT_FORMAT:
            raise CheckpointError(f"{path} is not an fcl-lightning client state (expected format {CLIENT_FORMAT!r})")
        if int(saved["client"]) != self.client or int(saved["round"]) != int(version):
            raise CheckpointError(
                f"{path} holds client {saved['client']}'s state after round {saved['round']}, "
                f"not client {self.client}'s after round {version}"
            )
        return saved["state"]

    def prune(self, below: int) -> list[int]:
        """Delete the versions older than ``below`` (no checkpoint that is kept whole names them)."""
        gone = [v for v in self.versions() if v < below]
        for v in gone:
            self.path(v).unlink(missing_ok=True)
        return gone


def save_checkpoint_file(obj: Any, path: str | Path) -> Path:
    """Write one file of a checkpoint (a round file, a client's state) atomically, without the zip
    records' CRC-32, which ``torch.load`` does not check and which was a third of the cost of
    writing them (:func:`fcl_lightning.io.atomic_save`)."""
    return atomic_save(obj, path, crc32=False)


def client_files(root: str | Path, client: int) -> ClientStateFiles:
    """Where an in-process client's states go: ``<root>/clients/client<c>/``."""
    return ClientStateFiles(layout.client_dir(root, client), client)


@dataclass
class RunState:
    """What the round engine carries from round to round; the server's checkpoint holds all of
    it but the clients' own states, which it names by version (``client_versions``)."""

    num_clients: int
    global_w: dict[str, torch.Tensor]
    client_w: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    #: select_best: client -> (best validation Dice, its weights)
    best: dict[int, tuple[float, dict[str, torch.Tensor]]] = field(default_factory=dict)
    inbox: dict[int, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    #: per-round, per-client Dice rows (a wandb table when wandb is on)
    dice_rows: list[list[Any]] = field(default_factory=list)
    new_dice_rows: list[list[Any]] = field(default_factory=list)
    comm: dict[str, int] = field(
        default_factory=lambda: {"weights_down": 0, "weights_up": 0, "features_down": 0, "features_up": 0}
    )
    round: int = 0  # rounds done
    #: client -> the rounds done when its current state was saved (absent: a fresh client)
    client_versions: dict[int, int] = field(default_factory=dict)
    #: client -> its oldest state a checkpoint kept whole still names (older ones may go)
    keep_from: dict[int, int] = field(default_factory=dict)
    #: the states the clients that trained in this process handed back this round, to be saved
    fresh_states: dict[int, Any] = field(default_factory=dict)
    #: the last round whose checkpoint is whole on disk (``None``: none yet)
    checkpointed: int | None = None
    #: per round done, what each client released under federation.privacy: [noise multiplier, releases]
    #: (``None``: sent without noise after privacy was turned off on a resume); empty: never private
    privacy_ledger: list[list[Any]] = field(default_factory=list)
    #: the federation.privacy settings the run trains under (``None``: off)
    privacy_settings: dict[str, Any] | None = None
    elapsed: float = 0.0  # seconds of training rounds (monitors, downstream runs, checkpoints excluded)
    round_started: float = 0.0

    def __post_init__(self) -> None:
        self.inbox = {c: self.inbox.get(c) for c in range(self.num_clients)}

    def finish_round(self, r: int, trained: dict[int, Any | None]) -> None:
        """Round ``r`` (0-based) is done: each client in ``trained`` now has the state it saved
        after it (``None``: saved where it trained, e.g. a Flower node; else to be saved here)."""
        self.round = r + 1
        self.fresh_states = {c: s for c, s in trained.items() if s is not None}
        self.client_versions.update({c: self.round for c in trained})

    def checkpoint(self, **run: Any) -> dict[str, Any]:
        """The server's round checkpoint (no client state; ``run``: the run's own entries: rounds,
        module, seed, config, rng, wandb and CSV ids)."""
        return {
            "format": FORMAT,
            "round": self.round,
            "num_clients": self.num_clients,
            "global": self.global_w,
            "client_weights": {str(c): w for c, w in self.client_w.items()},
            "client_versions": {str(c): v for c, v in self.client_versions.items()},
            "inbox": {str(c): bank_to_dict(b) for c, b in self.inbox.items() if b is not None},
            "history": self.history,
            "comm": self.comm,
            "elapsed_s": self.elapsed,
            "dice_rows": self.dice_rows,
            # select_best: each client's weights from its round with the best validation Dice (what `test` scores)
            "best_client_weights": {str(c): w for c, (_, w) in self.best.items()},
            "best_val_dice": {str(c): d for c, (d, _) in self.best.items()},
            "privacy": {"settings": self.privacy_settings, "ledger": self.privacy_ledger},
            **run,
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> RunState:
        C = int(ckpt["num_clients"])
        return cls(
            num_clients=C,
            global_w=ckpt["global"],
            client_w={int(c): w for c, w in ckpt["client_weights"].items()},
            best={int(c): (float(ckpt["best_val_dice"][c]), w) for c, w in ckpt.get("best_client_weights", {}).items()},
            inbox={c: bank_from_dict(ckpt["inbox"].get(str(c))) for c in range(C)},
            history=ckpt["history"],
            dice_rows=[list(r) for r in ckpt.get("dice_rows", [])],
            comm=ckpt["comm"],
            round=int(ckpt["round"]),
            client_versions=versions_of(ckpt),
            elapsed=float(ckpt["elapsed_s"]),
            privacy_ledger=[list(e) for e in (ckpt.get("privacy") or {}).get("ledger", [])],
            privacy_settings=(ckpt.get("privacy") or {}).get("settings"),
        )

    @property
    def privacy_spent(self) -> list[tuple[float | None, int]]:
        """The ledger as the accountant reads it: (noise multiplier, releases) per round."""
        return [(None if z is None else float(z), int(n)) for z, n in self.privacy_ledger]

    def record(self, metrics: dict[str, float]) -> None:
        """The round's ``round/`` (and ``downstream/``) figures into the history, its Dice rows
        into the table."""
        self.history.append({k: float(v) for k, v in metrics.items() if k.startswith(("round/", "downstream/"))})
        self.record_dice(metrics, self.round)

    def record_dice(self, metrics: dict[str, float], round_idx: int) -> None:
        self.new_dice_rows = per_client_dice_rows(metrics, round_idx)
        self.dice_rows += self.new_dice_rows


@runtime_checkable
class FederatedData(Protocol):
    """What the round engine and its hooks need of a datamodule
    (:class:`~fcl_lightning.data.datamodule.FederatedDataModule` has it all)."""

    num_clients: int
    num_partitions: int
    #: per client, its training / validation volumes; the shared test volumes
    train: Sequence[Sequence[Any]]
    val: Sequence[Sequence[Any]]
    test: Sequence[Any]

    @property
    def ready(self) -> bool:
        """Whether the volumes are loaded (a Flower server's datamodule never is)."""
        ...

    def setup(self, stage: str | None = None) -> None: ...

    def validation_volumes(self, client: int) -> Sequence[Any]:
        """The client's labelled held-out volumes (what validation scores)."""
        ...

    def place(self, device: torch.device | None) -> None:
        """Move the preprocessed volumes to ``device`` (``data.volumes_on``)."""
        ...


class FederationSettings(Protocol):
    """What the round engine's hooks read of the ``federation`` section
    (:class:`~fcl_lightning.federation.config.Federation` has it all; a Protocol here, so that
    this module needs nothing of the config's)."""

    rounds: int
    mode: Any  # federation.mode.Mode
    monitor: Any  # fcl.monitor.CollapseMonitor | None
    privacy: Any  # privacy.config.Privacy | None
    checkpoint_every: int
    checkpoint_keep: CheckpointKeep
    checkpoint_async: bool


@dataclass
class RunContext:
    """What a round hook sees of a run: its settings, module, data, folder and outputs, and one
    thing it may do (:meth:`log_metrics`); not the round engine. It changes the run only through
    what it adds to a round's ``metrics`` or the summary, and the files it writes."""

    fed: FederationSettings
    module: FederatedModule
    dm: FederatedData
    root: Path
    seed: int
    config_text: str
    loggers: list[Logger]
    console: Console  # round lines, tables: results (stdout)
    log_console: Console  # progress bar, notices (stderr)
    trainer_kwargs: dict[str, Any]
    #: whether the clients' states come back to this process (then saved under ``clients/``)
    states_come_back: bool = True

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log_metrics(metrics, step=step)


class RoundHook:
    """A hook of the round engine (Lightning-callback style); every method is optional. Per round:
    ``on_round_start``, ``on_client_start`` per client, ``on_round_end`` (add to ``metrics``), then
    the engine records the round in ``state.history``, then ``on_round_recorded`` (write, report).
    ``run`` is the :class:`RunContext`."""

    def check_data(self, run: RunContext) -> None:
        """After the data is loaded, before anything is written: raise a ``DataError`` if the
        data cannot serve this hook (runs where the clients' data is in this process)."""

    def on_run_start(self, run: RunContext, state: RunState) -> None:
        """Before the first round to run (``state.round`` rounds are already done on a resume)."""

    def on_round_start(self, run: RunContext, state: RunState, round_idx: int) -> None:
        """Before round ``round_idx`` (0-based) trains."""

    def on_client_start(self, run: RunContext, round_idx: int, i: int, client: int, n: int) -> None:
        """Before client ``client`` (the ``i``-th of ``n`` this round) trains."""

    def on_round_end(
        self, run: RunContext, state: RunState, results: dict[int, Any], metrics: dict[str, float]
    ) -> None:
        """After aggregation and routing of round ``state.round``: add figures to ``metrics``
        (``results``: client -> :class:`~fcl_lightning.federation.client.ClientResult`)."""

    def on_round_recorded(self, run: RunContext, state: RunState, metrics: dict[str, float]) -> None:
        """After the round is in ``state.history``: write and report it."""

    def on_run_end(self, run: RunContext, state: RunState, summary: dict[str, Any]) -> None:
        """After the last round (the run's weights are in the module): add to ``summary``."""

    def teardown(self, run: RunContext, error: BaseException | None) -> None:
        """Always, last hook first, also when the run fails (``error``); release what it holds."""


def versions_of(ckpt: dict[str, Any]) -> dict[int, int]:
    """client -> version of its state a server checkpoint names (an earlier format held the
    states themselves, under ``clients``: version 0 there means "in this file")."""
    if "client_versions" in ckpt:
        return {int(c): int(v) for c, v in ckpt["client_versions"].items()}
    return {int(c): 0 for c in ckpt.get("clients", {})}


def client_states_of(ckpt: dict[str, Any], root: str | Path) -> dict[int, Any]:
    """The in-process clients' states a server checkpoint names, read from their files (or, in
    the earlier format, from the checkpoint itself)."""
    if "client_versions" not in ckpt:
        return {int(c): s for c, s in ckpt.get("clients", {}).items()}
    return {c: client_files(root, c).load(v) for c, v in versions_of(ckpt).items()}


def round_files(ckdir: str | Path) -> dict[int, Path]:
    """round -> ``round-NNN.ckpt`` in ``ckdir``."""
    ckdir = Path(ckdir)
    if not ckdir.is_dir():
        return {}
    return {int(m.group(1)): p for p in ckdir.iterdir() if (m := layout.ROUND_FILE.fullmatch(p.name))}


def check_checkpoint(
    ckpt: dict[str, Any], path: Path, num_clients: int, rounds: int, module: Any, root: Path | None
) -> None:
    """A checkpoint to resume from against the config: clients, rounds, the model's shapes, and
    (``root``: clients in this process) every client state file it names."""
    if ckpt["num_clients"] != num_clients:
        raise CheckpointError(
            f"{path} was written with {ckpt['num_clients']} clients, the config has {num_clients} (data.num_clients)"
        )
    if ckpt["round"] > rounds:
        raise CheckpointError(
            f"{path} is from round {ckpt['round']}, after the configured "
            f"federation.rounds={rounds}: set federation.rounds >= {ckpt['round']} to go on"
        )
    problem = module.global_state_mismatch(ckpt["global"])
    if problem:
        raise CheckpointError(
            f"{path} does not fit the configured model ({type(module).__name__}): {problem}; "
            "resume with the config the run was started with"
        )
    if root is None or "client_versions" not in ckpt:
        return
    missing = [(c, v) for c, v in sorted(versions_of(ckpt).items()) if not client_files(root, c).path(v).is_file()]
    if missing:
        c, v = missing[0]
        whole = sorted(round_files(path.parent))
        raise CheckpointError(
            f"{path} names client {c}'s state after round {v} ({client_files(root, c).path(v)}), which is not "
            f"there ({len(missing)} of {len(versions_of(ckpt))} client states missing): older round files keep "
            "the global weights only (federation.checkpoint_keep.last); resume from checkpoints/last.ckpt"
            + (f" or a newer round file (on disk: rounds {', '.join(map(str, whole))})" if whole else "")
        )


def load_round_versions(ckdir: str | Path) -> dict[int, dict[int, int]]:
    """round -> the client versions each ``round-NNN.ckpt`` in ``ckdir`` names (read mapped)."""
    out = {}
    for r, p in round_files(ckdir).items():
        try:
            out[r] = versions_of(load_checkpoint(p, mmap=True))
        except CheckpointError:
            continue  # not ours to prune by
    return out
