"""The round checkpoint's one home: its format, resolving ``--ckpt_path`` and reading a
checkpoint once per resume (:func:`find_resume`), checking it against a config
(:func:`check_checkpoint`), writing it (CPU snapshots of what training goes on mutating, one
background writer), which round files stay on disk (:class:`CheckpointKeep`, :func:`retention`),
each client's own state in files beside it (:class:`ClientStateFiles`), the summary file, and
the error a bad checkpoint raises. What goes into it is :class:`~fcl_lightning.federation.state.RunState`'s.

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

import json
import logging
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fcl_lightning import layout
from fcl_lightning.errors import UserError
from fcl_lightning.fcl.memory_bank import BankEntries
from fcl_lightning.io import atomic_save, atomic_write_text, safe_torch_load

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from; the message names the file and the problem."""


FORMAT = "fcl-lightning/federated-v2"  # v2: client states in their own files
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


def update_summary(root: str | Path, values: dict[str, Any]) -> Path:
    """Merge ``values`` into ``<root>/summary.json`` (other stages' keys are kept)."""
    path = Path(root) / layout.SUMMARY
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}
    data.update(values)
    return atomic_write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n", path)


def to_cpu(obj: Any) -> Any:
    """Move every tensor in a nested structure to the CPU (checkpoints are device-free)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def snapshot(obj: Any, into: Any = None) -> Any:
    """A CPU copy of every tensor in a nested structure (``to_cpu`` without sharing storage), so
    that training may go on mutating the originals (e.g. Adam's moments) while it is written.

    ``into``: an earlier snapshot of the same structure that is no longer needed; its tensors of
    matching shape and dtype are overwritten instead of allocating new ones (fresh memory costs
    page faults, about as much as the copy itself for hundreds of MB).
    """
    if isinstance(obj, torch.Tensor):
        src = obj.detach()
        if (
            isinstance(into, torch.Tensor)
            and into.device.type == "cpu"
            and into.shape == src.shape
            and into.dtype == src.dtype
        ):
            return into.copy_(src)
        return src.to("cpu", copy=True)
    if isinstance(obj, dict):
        old = into if isinstance(into, dict) else {}
        return {k: snapshot(v, old.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        old = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(snapshot(v, o) for v, o in zip(obj, old))
    return obj


#: niceness of the background writer's thread: training threads come first while the write
#: takes the CPU time they leave (on 2 busy cores a write at the default priority slowed the
#: steps it overlapped by about its own CPU time; at +10 by about half, spread over more steps)
WRITER_NICENESS = 10


def lower_priority(niceness: int = WRITER_NICENESS) -> None:
    """Lower the calling thread's CPU priority (Linux, where threads have their own; elsewhere
    nothing)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


class BackgroundWriter:
    """Runs checkpoint writes on one background thread, at most one in flight, so that serialising
    and writing round r's checkpoint overlaps round r+1's training.

    ``submit`` waits for the previous write first; ``wait`` joins and re-raises a write's error;
    what a write returns is handed to ``on_done`` in the thread that waits, so the writer thread
    never touches the caller's state;
    leaving a ``with`` block waits too (logging, not raising, a write's error when the block itself
    failed: that error is the one to report). The thread is not a daemon: an interrupted run still finishes the write it started, and every
    file is written atomically, so a checkpoint on disk is always whole.
    ``enabled=False`` writes in the caller's thread.
    """

    def __init__(self, enabled: bool = True, on_done: Callable[[Any], None] | None = None) -> None:
        self.enabled = enabled
        self.on_done = on_done
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._result: list[Any] = []  # a finished write's return value, not yet handed over

    def submit(self, write: Callable[[], Any]) -> None:
        self.wait()
        if not self.enabled:
            self._done(write())
            return

        def target() -> None:
            lower_priority()
            try:
                self._result.append(write())
            except BaseException as exc:  # handed to the main thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=target, name="fcl-checkpoint-writer")
        self._thread.start()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.wait()
            return
        try:
            self.wait()
        except UserError as err:
            log.error("%s", err)

    def check(self) -> None:
        """Hand over the result, or re-raise the error, of a write that has already finished (does
        not wait for one in flight)."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        while self._result:
            self._done(self._result.pop())
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, UserError):  # already names the file and the round
                raise err
            raise CheckpointError(f"writing a round checkpoint failed: {type(err).__name__}: {err}") from err

    def _done(self, result: Any) -> None:
        if self.on_done is not None:
            self.on_done(result)
