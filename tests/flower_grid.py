"""A Flower ``Grid`` without a network, for tests: every node is a ``ClientApp`` called in this
process with its own ``Context``; chosen nodes fail or stay silent, and all traffic is recorded."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


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
