"""A Flower ``Grid`` without a network, for tests: every node is a ``ClientApp`` called in this
process with its own ``Context``; chosen nodes fail or stay silent, and all traffic is recorded."""

from __future__ import annotations

import shlex
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fcl_lightning.flower.apps import client_app
from fcl_lightning.flower.server import run_server


class LocalGrid(Grid):
    def __init__(
        self,
        app,
        run_config: dict,
        node_configs: dict[int, dict],
        fail: dict[int, set[int]] | None = None,
        silent: dict[int, set[int]] | None = None,
    ) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        self.app = app
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config=cfg, state=RecordDict(), run_config=run_config)
            for n, cfg in node_configs.items()
        }
        self.fail = fail or {}  # round -> nodes that raise
        self.silent = silent or {}  # round -> nodes that never answer
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def set_run(self, run) -> None:  # pragma: no cover - not used by the server logic
        self._run = run

    @property
    def run(self):  # pragma: no cover
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover - send_and_receive is what the server uses
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            self.sent.append(m)
            node = m.metadata.dst_node_id
            rnd = int(m.metadata.group_id) if m.metadata.group_id else -1
            if node in self.silent.get(rnd, set()):
                continue
            if node in self.fail.get(rnd, set()):
                out.append(Message(Error(code=1, reason=f"node {node} crashed"), reply_to=m))
                continue
            reply = self.app(m, self.contexts[node])
            self.replies.append(reply)
            out.append(reply)
        return out


def flower_run(tmp_path, tiny, root, clients=2, rounds=2, extra=(), node_extra=None, **grid_kw):
    base = tmp_path / "base.yaml"
    base.write_text("seed_everything: 0\n")
    overrides = tiny(root, rounds=rounds, clients=clients, extra=extra)[1:]
    run_config = {"config": str(base), "overrides": " ".join(shlex.quote(a) for a in overrides), "wait-s": 5}
    nodes = {100 + c: {"partition-id": c, **(node_extra or {})} for c in range(clients)}
    grid = LocalGrid(client_app, run_config, nodes, **grid_kw)
    summary = run_server(grid, run_config)
    return grid, summary
