"""The Flower server side: the project's own :class:`~fcl_lightning.federation.loop.FederatedLoop`
(aggregator plug-in, feature routing, round checkpoints, resume, logging) with the client steps
of each round sent to Flower nodes instead of run in-process.

Run config (``pyproject.toml`` of ``flower/``, or ``flwr run --run-config``): ``config`` (the
project YAML), optional ``overrides`` (space-separated CLI arguments), ``num-clients`` (0 or unset:
the config's ``data.num_clients``), ``ckpt-path`` (``last`` to resume), ``wait-s`` (how long to
wait for ``federation.min_clients`` nodes to connect).
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from rich.console import Console

from fcl_lightning.errors import UserError
from fcl_lightning.federation.client import ClientResult
from fcl_lightning.federation.loop import Clients, FederatedLoop
from fcl_lightning.flower.client import config_args
from fcl_lightning.flower.codec import features_to_record, record_to_features, record_to_weights, weights_to_record


class SiteError(UserError):
    """A site could not take part: its config or data is bad (the site's own message)."""


class FlowerClients(Clients):
    """Sends each round's client steps to the Flower nodes and collects the replies; a node that
    errors or does not answer within ``timeout`` is left out of that round (and logged)."""

    def __init__(
        self,
        grid: Grid,
        num_clients: int,
        timeout: float | None = None,
        min_nodes: int = 1,
        wait_s: float = 60.0,
        console: Console | None = None,
    ) -> None:
        self.grid, self.num_clients, self.timeout = grid, num_clients, timeout
        self.console = console or Console(stderr=True)
        self.failures: dict[int, str] = {}
        self.node_of: dict[int, int] = {}
        self._connect(min_nodes, wait_s)

    def _connect(self, min_nodes: int, wait_s: float) -> None:
        """Wait for nodes and ask each which client it is (``query.info``)."""
        deadline = time.monotonic() + wait_s
        while len(list(self.grid.get_node_ids())) < min_nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(list(self.grid.get_node_ids()))} Flower node(s) connected within "
                    f"{wait_s:.0f} s; federation.min_clients is {min_nodes}"
                )
            time.sleep(1.0)
        self.refresh()

    def refresh(self) -> None:
        nodes = sorted(self.grid.get_node_ids())
        msgs = [
            Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query.info") for n in nodes
        ]
        errors = []
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                errors.append(
                    f"node {node}: {reply.error.reason.strip().splitlines()[-1] if reply.error.reason else 'error'}"
                )
                continue
            info = reply.content["info"]
            if "error" in info:
                raise SiteError(f"{info['error']} (node {node})")
            c = int(info["client"])
            if not 0 <= c < self.num_clients:
                raise RuntimeError(
                    f"node {reply.metadata.src_node_id} says it is client {c}, "
                    f"outside the federation's {self.num_clients} clients"
                )
            if c in self.node_of and self.node_of[c] != reply.metadata.src_node_id:
                raise RuntimeError(f"two nodes claim client {c} (partition-id must be unique)")
            self.node_of[c] = reply.metadata.src_node_id
        self.console.print(
            f"flower: {len(self.node_of)} client node(s): "
            + ", ".join(f"client {c} = node {n}" for c, n in sorted(self.node_of.items())),
            markup=False,
        )
        for e in errors:
            self.console.print(f"[yellow]flower: a node failed to answer: {e}[/]", soft_wrap=True)

    def train_round(self, round_idx, starts, inbox, progress) -> dict[int, ClientResult]:
        if len(self.node_of) < len(starts):
            self.refresh()  # nodes may have joined since
        self.failures = {}
        msgs, client_of = [], {}
        weight_records: dict[int, Any] = {}
        for c, start in sorted(starts.items()):
            if c not in self.node_of:
                self.failures[c] = "no node connected"
                continue
            if id(start) not in weight_records:  # federated: one record of the global weights for all
                weight_records[id(start)] = weights_to_record(start)
            rec = weight_records[id(start)]
            # which saved state the node starts from, and the oldest one a kept checkpoint names
            st = self.run_state
            version = st.client_versions.get(c, 0) if st is not None else 0
            keep_from = st.keep_from.get(c, version) if st is not None else version
            config = ConfigRecord({"round": round_idx, "state-version": version, "keep-from": min(keep_from, version)})
            if self.noise_multiplier is not None:  # as the run fixed it (a resume may have recalibrated it)
                config["noise-multiplier"] = float(self.noise_multiplier)
            content = RecordDict({"weights": rec, "config": config})
            if inbox.get(c) is not None:
                content["features"] = features_to_record(inbox[c])
            msg = Message(content, dst_node_id=self.node_of[c], message_type="train", group_id=str(round_idx))
            msgs.append(msg)
            client_of[self.node_of[c]] = c
        progress(0, min(client_of.values(), default=-1), len(msgs))
        results: dict[int, ClientResult] = {}
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            c = client_of.get(reply.metadata.src_node_id)
            if c is None:
                continue
            if reply.has_error():
                self.failures[c] = f"error: {reply.error.reason}"
                continue
            m = dict(reply.content["metrics"])
            n = int(m.pop("num-examples"))
            feats = record_to_features(reply.content["features"]) if "features" in reply.content else None
            results[c] = ClientResult(
                update=record_to_weights(reply.content["update"]),
                num_samples=n,
                state=None,  # saved on the node
                features=feats,
                metrics={k: float(v) for k, v in m.items()},
            )
        for c in client_of.values():
            if c not in results and c not in self.failures:
                self.failures[c] = "timed out" if self.timeout else "no reply"
        return results


def run_server(grid: Grid, run_config: dict[str, Any], console: Console | None = None) -> dict[str, Any]:
    """Build the project config and run the federated loop with Flower clients."""
    from fcl_lightning.cli import build

    console = console or Console(stderr=True)
    cli = build(config_args(run_config))
    fed = cli.config_init["federation"]
    if not fed.mode.global_model:
        raise ValueError("Flower runs federation.mode federated (local mode needs no server)")
    if fed.downstream is not None:
        console.print(
            "[yellow]federation.downstream is skipped on Flower: the server holds no data; "
            "run it on a site with `fcl-lightning fit` on the written encoder.pt[/]"
        )
        fed.downstream = None
    root = cli.trainer.default_root_dir
    config_text = cli.portable_config()  # the loop writes it once the run's checks have passed
    loop = FederatedLoop(
        fed,
        cli.model,
        cli.datamodule,
        trainer_kwargs=dict(cli.config_init["trainer"]),
        root_dir=root,
        loggers=cli.trainer.loggers,
        seed=int(cli.config.get("seed_everything") or 0),
        config_text=config_text,
        console=console,
    )
    num_clients = int(run_config.get("num-clients", 0)) or cli.datamodule.num_clients
    clients = FlowerClients(
        grid,
        num_clients,
        timeout=fed.round_timeout,
        min_nodes=fed.min_clients,
        wait_s=float(run_config.get("wait-s", 60.0)),
        console=console,
    )
    ckpt = str(run_config.get("ckpt-path", "")) or None
    return loop.run(ckpt, clients=clients)
