"""The Flower client side: a node trains its own client with :func:`client_step`, the same
function the in-process loop calls, and keeps its state (momentum encoder, local bank, optimiser)
on the node: in ``Context.state`` or, when the node config names a ``state-dir``, on its disk
only (``state-NNN.pt``, as an in-process client's; nothing of it stays in memory between rounds).
The server names in each message which saved state the round starts from (``state-version``,
the rounds done when it was saved; 0: a fresh client) and the oldest one a checkpoint it keeps
still names (``keep-from``), so a server resumed from any kept checkpoint gets the same bits.

Node config (``flower-supernode --node-config``): ``partition-id`` (this client's id in the
federation, 0..C-1); optional ``data-root``: this site's own data folder in any layout
(:class:`~fcl_lightning.data.folders.FolderSource`), which makes the node's datamodule hold only
that site (``data.num_clients`` 1, client ``partition-id``'s split); optional
``overrides`` (CLI-style arguments for this site only, e.g. ``--data.source.patients=1-10``);
optional ``state-dir`` (the client state on disk, for restarts and for many simulated nodes). Run config (``pyproject.toml`` / ``flwr run --run-config``): ``config``
(the project YAML), optional ``overrides`` (CLI-style arguments, space-separated).
"""

from __future__ import annotations

import logging
import shlex
from typing import Any

from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict

from fcl_lightning.errors import UserError
from fcl_lightning.federation.checkpoint import CheckpointError, ClientStateFiles, to_cpu
from fcl_lightning.federation.client import ClientRuntime, client_step
from fcl_lightning.flower.codec import (
    bytes_to_state,
    features_to_record,
    record_to_features,
    record_to_weights,
    state_to_bytes,
    weights_to_record,
)

log = logging.getLogger(__name__)
STATE_KEY = "fcl-client"  # Context.state entries fcl-client-NNN: the states this node keeps
_RUNTIMES: dict[tuple, ClientRuntime] = {}  # one built module + datamodule per process and config (not per node)


def config_args(run_config: dict[str, Any], node_config: dict[str, Any] | None = None) -> list[str]:
    """CLI arguments of the project config named by the Flower run config (and a site's node config)."""
    if "config" not in run_config:
        raise ValueError("the Flower run config needs `config` (the project YAML, e.g. configs/demo_pretrain.yaml)")
    args = ["--config", str(run_config["config"]), *shlex.split(str(run_config.get("overrides", "")))]
    node_config = node_config or {}
    if node_config.get("data-root"):  # a real site: its datamodule holds its own folder, in any layout
        args += [
            "--data.source=fcl_lightning.data.folders.FolderSource",
            f"--data.source.root={node_config['data-root']}",
            "--data.root=null",
            "--data.num_clients=1",
            "--data.split=iid",
            f"--data.first_client={int(node_config.get('partition-id', 0))}",
        ]
    args += shlex.split(str(node_config.get("overrides", "")))
    return args


def get_runtime(run_config: dict[str, Any], node_config: dict[str, Any]) -> ClientRuntime:
    """Build (once per process) the module, datamodule and Trainer factory from the project config,
    load this site's data and run the data checks of ``fit`` on it."""
    from fcl_lightning.cli import build
    from fcl_lightning.federation.loop import FederatedLoop

    args = config_args(run_config, node_config)
    key = tuple(args)  # one runtime serves every client of this config (client_step swaps their state)
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
        loop.check_data()
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


def state_files(context: Context, client: int) -> ClientStateFiles | None:
    """The node's state files (node config ``state-dir``), or ``None``: states in ``Context.state``."""
    d = context.node_config.get("state-dir")
    return ClientStateFiles(d, client) if d else None


def memory_versions(context: Context) -> list[int]:
    prefix = f"{STATE_KEY}-"
    return sorted(int(k[len(prefix) :]) for k in context.state.keys() if k.startswith(prefix))


def load_state(context: Context, client: int, version: int) -> Any:
    """The state this client saved after round ``version`` (0: a fresh client, ``None``)."""
    if version == 0:
        return None
    files = state_files(context, client)
    if files is not None:
        if not files.path(version).is_file():
            raise CheckpointError(
                f"client {client}: the server resumes it from its state after round {version}, "
                f"which {files.folder} (node config state-dir) does not hold (it has rounds {files.versions() or 'none'})"
            )
        return files.load(version)
    key = f"{STATE_KEY}-{version:03d}"
    if key not in context.state:
        raise CheckpointError(
            f"client {client}: the server resumes it from its state after round {version}, which this node "
            f"does not hold (it has rounds {memory_versions(context) or 'none'}; a restarted node keeps its "
            "states only with node config state-dir)"
        )
    return bytes_to_state(context.state[key]["state"])


def save_state(context: Context, client: int, state: Any, version: int, keep_from: int) -> None:
    """Save this client's state after round ``version``; drop the ones older than ``keep_from``."""
    files = state_files(context, client)
    if files is not None:
        files.save(version, state)
        files.prune(keep_from)
        return
    context.state[f"{STATE_KEY}-{version:03d}"] = ConfigRecord({"state": state_to_bytes(state), "round": version})
    for v in memory_versions(context):
        if v < keep_from:
            del context.state[f"{STATE_KEY}-{v:03d}"]


def query_reply(content: RecordDict, context: Context) -> RecordDict:
    """Who am I: the server maps its client ids to nodes with this. The site loads and checks its
    data here, before round 1; a bad config or bad data comes back as the site's own one-line
    message (``error``), which the server reports and stops on."""
    try:
        runtime = get_runtime(context.run_config, context.node_config)
        client, _ = client_ids(context.node_config, runtime)
    except (UserError, ValueError) as exc:
        site = context.node_config.get("partition-id", "?")
        return RecordDict({"info": ConfigRecord({"client": -1, "error": f"site {site}: {exc}"})})
    return RecordDict({"info": ConfigRecord({"client": client})})


def train_reply(content: RecordDict, context: Context) -> RecordDict:
    """One round: global weights (+ the other clients' features) in; update, sample count,
    metrics and this client's own features out."""
    runtime = get_runtime(context.run_config, context.node_config)
    client, data_client = client_ids(context.node_config, runtime)
    config = content["config"]
    round_idx, version = int(config["round"]), int(config.get("state-version", 0))
    if "noise-multiplier" in config and runtime.privacy is not None:  # the server's, as its run fixed it
        runtime.privacy.noise_multiplier = float(config["noise-multiplier"])
    weights = record_to_weights(content["weights"])
    remote = record_to_features(content["features"]) if "features" in content else None
    res = client_step(
        weights,
        load_state(context, client, version),
        remote,
        client=client,
        round_idx=round_idx,
        runtime=runtime,
        data_client=data_client,
    )
    save_state(context, client, to_cpu(res.state), round_idx + 1, int(config.get("keep-from", version)))
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
