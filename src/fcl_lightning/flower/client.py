"""The Flower client side: a node trains its own client with :func:`client_step`, the same
function the in-process loop calls, and keeps its state (momentum encoder, local bank, optimiser)
on the node: in ``Context.state`` and, when the node config names a ``state-dir``, on its disk.

Node config (``flower-supernode --node-config``): ``partition-id`` (this client's id in the
federation, 0..C-1); optional ``data-root``: this site's own data folder, which makes the node's
datamodule hold only that site (``data.root`` set, ``data.num_clients`` 1); optional
``overrides`` (CLI-style arguments for this site only, e.g. ``--data.source.patients=1-10``);
optional ``state-dir`` (the client state also on disk, for restarts). Run config (``pyproject.toml`` / ``flwr run --run-config``): ``config``
(the project YAML), optional ``overrides`` (CLI-style arguments, space-separated).
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict

from fcl_lightning.federation.checkpoint import CheckpointError, to_cpu
from fcl_lightning.federation.client import ClientRuntime, client_step
from fcl_lightning.flower.codec import (
    bytes_to_state,
    features_to_record,
    record_to_features,
    record_to_weights,
    state_to_bytes,
    weights_to_record,
)
from fcl_lightning.io import atomic_save, safe_torch_load

log = logging.getLogger(__name__)
STATE_KEY = "fcl-client"
STATE_FORMAT = "fcl-lightning/client-state-v1"
_RUNTIMES: dict[tuple, ClientRuntime] = {}  # one built module + datamodule per process and config


def config_args(run_config: dict[str, Any], node_config: dict[str, Any] | None = None) -> list[str]:
    """CLI arguments of the project config named by the Flower run config (and a site's node config)."""
    if "config" not in run_config:
        raise ValueError("the Flower run config needs `config` (the project YAML, e.g. configs/demo_pretrain.yaml)")
    args = ["--config", str(run_config["config"]), *shlex.split(str(run_config.get("overrides", "")))]
    node_config = node_config or {}
    if node_config.get("data-root"):  # a real site: its datamodule holds its own data only
        args += [f"--data.root={node_config['data-root']}", "--data.num_clients=1", "--data.split=iid"]
    args += shlex.split(str(node_config.get("overrides", "")))
    return args


def get_runtime(run_config: dict[str, Any], node_config: dict[str, Any]) -> ClientRuntime:
    """Build (once per process) the module, datamodule and Trainer factory from the project config."""
    from fcl_lightning.cli import build
    from fcl_lightning.federation.loop import FederatedLoop

    args = config_args(run_config, node_config)
    key = (*args, node_config.get("partition-id"))
    if key not in _RUNTIMES:
        cli = build(args)
        loop = FederatedLoop(
            cli.config_init["federation"],
            cli.model,
            cli.datamodule,
            trainer_kwargs=dict(cli.config_init["trainer"]),
            root_dir=cli.trainer.default_root_dir,
            seed=int(cli.config.get("seed_everything") or 0),
        )
        cli.datamodule.setup("fit")
        _RUNTIMES[key] = loop.client_runtime()
    return _RUNTIMES[key]


def client_ids(node_config: dict[str, Any], runtime: ClientRuntime) -> tuple[int, int]:
    """(federation-wide client id, index of this node's data in its datamodule)."""
    if "partition-id" not in node_config:
        raise ValueError("the node config needs partition-id (this client's id, 0..C-1)")
    client = int(node_config["partition-id"])
    n = runtime.datamodule.num_clients
    if n == 1:  # a site whose datamodule holds only its own data
        return client, 0
    if not 0 <= client < n:
        raise ValueError(f"partition-id {client} is outside the config's {n} clients")
    return client, client


def load_state(context: Context) -> Any:
    if STATE_KEY in context.state:
        return bytes_to_state(context.state[STATE_KEY]["state"])
    d = context.node_config.get("state-dir")
    path = Path(d) / "client_state.pt" if d else None
    if path is not None and path.is_file():  # a restarted node picks up its own state
        saved = safe_torch_load(path, "client state", CheckpointError)
        if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path} is not an fcl-lightning client state ({STATE_FORMAT})")
        return saved["state"]
    return None


def save_state(context: Context, state: Any, round_idx: int) -> None:
    context.state[STATE_KEY] = ConfigRecord({"state": state_to_bytes(state), "round": round_idx})
    d = context.node_config.get("state-dir")
    if d:
        atomic_save({"format": STATE_FORMAT, "round": round_idx, "state": state}, Path(d) / "client_state.pt")


def query_reply(content: RecordDict, context: Context) -> RecordDict:
    """Who am I: the server maps its client ids to nodes with this."""
    runtime = get_runtime(context.run_config, context.node_config)
    client, _ = client_ids(context.node_config, runtime)
    return RecordDict({"info": ConfigRecord({"client": client})})


def train_reply(content: RecordDict, context: Context) -> RecordDict:
    """One round: global weights (+ the other clients' features) in; update, sample count,
    metrics and this client's own features out."""
    runtime = get_runtime(context.run_config, context.node_config)
    client, data_client = client_ids(context.node_config, runtime)
    round_idx = int(content["config"]["round"])
    weights = record_to_weights(content["weights"])
    remote = record_to_features(content["features"]) if "features" in content else None
    res = client_step(
        weights,
        load_state(context),
        remote,
        client=client,
        round_idx=round_idx,
        runtime=runtime,
        data_client=data_client,
    )
    save_state(context, to_cpu(res.state), round_idx)
    reply = RecordDict(
        {
            "update": weights_to_record(res.update),
            "metrics": MetricRecord({"num-examples": int(res.num_samples), **res.metrics}),
            "info": ConfigRecord({"client": client}),
        }
    )
    if res.features is not None:
        reply["features"] = features_to_record(res.features)
    return reply


#: the ClientApp's message handlers by message type, as the node's worker runs them too
REPLIES = {"query": query_reply, "train": train_reply}
