"""A node's long-lived client runtime for Flower deployments.

Flower 1.42 runs every message in a fresh ``flwr-clientapp`` process (also under process
isolation: its task workers are single-use), so each message imported torch and rebuilt the
module, the data and the Trainers. With ``worker="<socket path>"`` in a SuperNode's node config,
the ClientApp imports neither: it relays the message's content and the node's ``Context`` to this
process over a Unix socket, which keeps the runtime (module, preprocessed data, each client's
Trainer) between messages and runs the same handlers (:mod:`fcl_lightning.flower.client`). The
client state still travels in ``Context.state`` (or lies in the node's ``state-dir``), so a
restarted worker loses nothing.

Start one next to each SuperNode, before ``flwr run``::

    python -m fcl_lightning.flower.worker --socket /tmp/fcl-site0.sock
    flower-supernode ... --node-config 'partition-id=0 worker="/tmp/fcl-site0.sock"'

The socket is created readable and writable by its owner only (``0600``): messages are
pickles, so only processes of the user who runs the SuperNode may talk to the worker.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """The node's worker could not be reached, or failed on a message."""


def relay(kind: str, content: Any, context: Any) -> Any:
    """Send one message's ``content`` and the node's ``context`` to the node's worker; return the
    reply's content, with the worker's ``Context.state`` copied back into ``context``."""
    path = str(context.node_config["worker"])
    try:
        conn = Client(path, family="AF_UNIX")
    except OSError as exc:
        raise WorkerError(
            f"no fcl-lightning worker at {path} (node config `worker`): start one next to this SuperNode "
            f"with `python -m fcl_lightning.flower.worker --socket {path}` ({exc.strerror or exc})"
        ) from exc
    with conn:
        conn.send((kind, content, context))
        status, payload = conn.recv()
    if status != "ok":
        raise WorkerError(f"the worker at {path} failed on a {kind} message:\n{payload}")
    reply, state = payload
    for key in list(context.state.keys()):
        if key not in state:  # a state the worker dropped
            del context.state[key]
    for key in list(state.keys()):
        context.state[key] = state[key]
    return reply


def serve(path: str | Path, max_messages: int | None = None) -> None:
    """Answer messages on the Unix socket ``path`` one at a time, until stopped (or after
    ``max_messages``); a message that fails is reported to its ClientApp, the worker goes on."""
    from fcl_lightning.flower.client import REPLIES  # torch, Lightning, the data: once per worker

    path = Path(path)
    if path.is_socket():
        path.unlink()  # left behind by a worker that was killed
    old = os.umask(0o177)
    try:
        listener = Listener(str(path), family="AF_UNIX")
    finally:
        os.umask(old)
    log.info("fcl-lightning worker listening on %s", path)
    served = 0
    with listener:
        while max_messages is None or served < max_messages:
            with listener.accept() as conn:
                try:
                    kind, content, context = conn.recv()
                    reply = ("ok", (REPLIES[kind](content, context), context.state))
                except Exception:
                    reply = ("error", traceback.format_exc())
                try:
                    conn.send(reply)
                except OSError:  # the ClientApp went away (its process was stopped): serve the next
                    log.warning("a ClientApp left before its %s reply", reply[0])
            served += 1


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True, help="Unix socket path (the node config's `worker`)")
    args = ap.parse_args(argv)
    path = Path(args.socket)
    problem = None
    if not path.parent.is_dir():
        problem = f"--socket {path}: the folder {path.parent} does not exist"
    elif path.exists() and not path.is_socket():
        problem = f"--socket {path} is an existing file, not a socket: choose another path"
    if problem:
        sys.stderr.write(f"error: {problem}\n")
        raise SystemExit(2)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    serve(args.socket)


if __name__ == "__main__":
    main()
