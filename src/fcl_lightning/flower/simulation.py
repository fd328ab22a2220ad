"""Many sites on one machine: the project's ServerApp logic and ClientApp handlers under Flower's
simulation runtime (``flwr[simulation]``, a Ray backend), with ``--num-supernodes`` virtual
SuperNodes. Node ``i`` is client ``i`` (Flower's ``partition-id``); each round the server trains
the clients ``federation.clients_per_round`` samples, as in-process. With ``--state-root`` each
client's state lies on disk only (``<state-root>/client<i>/state-NNN.pt``, as a site's
``state-dir``), so the memory holds the states of the clients that are training, not of all;
without it they stay in Flower's per-node ``Context.state``. Each Ray worker process builds the
module and the data once and serves every node it is given. Same seed, same bits as ``fit``
(tested)::

    python -m fcl_lightning.flower.simulation --config configs/demo_pretrain.yaml \\
        --num-supernodes 100 --state-root runs/sim100/states -- \\
        --data.num_clients=100 --data.source.num_subjects=200 --data.source.num_sites=100 \\
        --federation.clients_per_round=10 --trainer.default_root_dir=runs/sim100

Flower 1.42's Python entry to its simulation runtime, ``flwr.simulation.run_simulation``, is
marked deprecated in favour of ``flwr run`` against a SuperLink started with ``--simulation``; it
is the one that runs in this process without a SuperLink, and what this module wraps.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def apps(
    run_config: dict[str, Any], state_root: str | None = None, failure: list[BaseException] | None = None
) -> tuple[Any, Any]:
    """A ServerApp and a ClientApp bound to ``run_config`` (the simulation runtime gives its nodes
    no run config of ours; the apps' handlers are closures, so Ray ships them, config and all,
    to its workers). The server's error, if any, is appended to ``failure`` (the runtime itself
    would only log it and return as if the run had ended well)."""
    from flwr.app import Message
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    server_app, client_app = ServerApp(), ClientApp()
    rc = dict(run_config)

    @server_app.main()
    def _server(grid, context) -> None:
        from fcl_lightning.flower.server import run_server

        try:
            run_server(grid, rc)
        except BaseException as exc:
            if failure is not None:
                failure.append(exc)
            raise

    def answer(kind: str, msg: Message, context: Any) -> Message:
        from fcl_lightning.flower.client import REPLIES

        node = dict(context.node_config)
        if state_root:
            node["state-dir"] = str(Path(state_root) / f"client{int(node['partition-id'])}")
        # Context.run_config cannot be set; the handlers read only these three fields
        view = SimpleNamespace(run_config=rc, node_config=node, state=context.state)
        return Message(REPLIES[kind](msg.content, view), reply_to=msg)

    @client_app.train()
    def _train(msg, context):
        return answer("train", msg, context)

    @client_app.query("info")
    def _info(msg, context):
        return answer("query", msg, context)

    return server_app, client_app


def simulate(
    config: str,
    overrides: list[str],
    num_supernodes: int,
    state_root: str | None = None,
    cpus: int | None = None,
    cpus_per_client: float = 1.0,
    ckpt_path: str | None = None,
) -> None:
    """Run the federation of ``config`` (+ ``overrides``) on ``num_supernodes`` simulated nodes;
    the server's outputs go to ``trainer.default_root_dir`` as with ``fit``."""
    from flwr.simulation import run_simulation

    run_config = {"config": config, "overrides": " ".join(map(shlex.quote, overrides)), "wait-s": 120}
    run_config["num-clients"] = num_supernodes
    if ckpt_path:
        run_config["ckpt-path"] = ckpt_path
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    failure: list[BaseException] = []
    server_app, client_app = apps(run_config, state_root, failure)
    backend = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus or os.cpu_count() or 1, "log_to_driver": True},
    }
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    try:
        run_simulation(server_app, client_app, num_supernodes=num_supernodes, backend_config=backend)
    finally:
        for sig, handler in handlers.items():  # ray.init installs a SIGTERM handler and leaves it
            signal.signal(sig, handler)
    if failure:
        raise failure[0]


def check_run(config: str, overrides: list[str], num_supernodes: int, ckpt_path: str | None = None) -> None:
    """Everything ``fit`` checks before it starts, here before Ray does: the config parses and
    builds, one simulated node per client, and the run folder and a checkpoint to resume from
    suit the config; raises the one ``UserError`` (or the parser's exit 2) for bad input."""
    from fcl_lightning.cli import build, check_config_files
    from fcl_lightning.errors import ConfigError
    from fcl_lightning.federation.checkpoint import load_checkpoint, resolve_ckpt_path
    from fcl_lightning.federation.loop import FederatedLoop

    if not Path(config).is_file():
        raise ConfigError(f"--config {config}: no such file")
    if num_supernodes < 1:
        raise ConfigError(f"--num-supernodes must be >= 1, got {num_supernodes}")
    args = ["--config", config, *overrides]
    check_config_files(args)
    cli = build(args)
    clients = cli.datamodule.num_clients
    if num_supernodes != clients:
        raise ConfigError(
            f"--num-supernodes {num_supernodes} but data.num_clients is {clients}: the simulation runs one node per "
            f"client; set both to the same number"
        )
    fed = cli.config_init["federation"]
    if not fed.mode.global_model:
        raise ConfigError("Flower runs federation.mode federated (local mode needs no server)")
    loop = FederatedLoop(fed, cli.model, cli.datamodule, root_dir=cli.trainer.default_root_dir)
    path = resolve_ckpt_path(ckpt_path, loop.root, missing_last_ok=True)
    loop.validate(load_checkpoint(path) if path is not None else None, path, clients, states_here=False)


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments end the command with one ``error:`` line and exit 2, as ``fcl-lightning``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see: python -m fcl_lightning.flower.simulation --help)\n")


def main(argv: list[str] | None = None) -> None:
    ap = _OneLineParser(
        description="Run a federation under Flower's simulation runtime (Ray): one virtual node per client.",
        epilog="Arguments after -- are fcl-lightning config overrides, e.g. --data.num_clients=100.",
    )
    ap.add_argument("--config", required=True, help="the project YAML")
    ap.add_argument("--num-supernodes", type=int, required=True, help="simulated nodes = clients (data.num_clients)")
    ap.add_argument("--state-root", default=None, help="keep each client's state on disk here, not in memory")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    ap.add_argument("--cpus-per-client", type=float, default=1.0, help="CPUs each training node takes")
    ap.add_argument("--ckpt-path", default=None, help="resume the server from a round checkpoint (`last`)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.cpus is not None and args.cpus < 1:
        ap.error(f"--cpus must be >= 1, got {args.cpus}")
    if not args.cpus_per_client > 0:
        ap.error(f"--cpus-per-client must be > 0, got {args.cpus_per_client}")
    from fcl_lightning.errors import debug_requested, run_reporting_errors

    debug, overrides = debug_requested(args.overrides)

    def run() -> None:
        from fcl_lightning.cli import packaged_config

        args.config = packaged_config(args.config)  # a shipped config from any folder, as fit finds it
        if args.state_root and Path(args.state_root).exists() and not Path(args.state_root).is_dir():
            from fcl_lightning.errors import ConfigError

            raise ConfigError(f"--state-root {args.state_root} is a file, not a folder")
        check_run(args.config, overrides, args.num_supernodes, args.ckpt_path)
        simulate(
            args.config,
            overrides,
            args.num_supernodes,
            args.state_root,
            args.cpus,
            args.cpus_per_client,
            args.ckpt_path,
        )

    run_reporting_errors(run, debug)


if __name__ == "__main__":
    main()
