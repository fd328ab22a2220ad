"""Flower with no work: the project's message pattern (one ``query.info`` per node, then a
``train`` message per node and round, each answered by a reply of the same size) with replies
computed in no time, so that a run's wall time is what Flower itself costs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    deadline = time.monotonic() + float(cfg["wait-s"])
    while len(list(grid.get_node_ids())) < int(cfg["nodes"]):
        if time.monotonic() > deadline:
            raise TimeoutError("not enough nodes connected")
        time.sleep(0.2)
    nodes = sorted(grid.get_node_ids())
    info = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query.info") for n in nodes]
    list(grid.send_and_receive(info))
    payload = np.zeros(int(cfg["payload-bytes"]), dtype=np.uint8)
    rounds = []
    for r in range(int(cfg["rounds"])):
        t0 = time.perf_counter()
        msgs = [
            Message(RecordDict({"w": ArrayRecord([payload])}), dst_node_id=n, message_type="train", group_id=str(r))
            for n in nodes
        ]
        replies = list(grid.send_and_receive(msgs))
        assert all(rep.has_content() for rep in replies), "a node failed"
        rounds.append(time.perf_counter() - t0)
    if cfg["done"]:
        Path(str(cfg["done"])).write_text(" ".join(f"{s:.3f}" for s in rounds))


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return Message(msg.content, reply_to=msg)


@client_app.query("info")
def _info(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"info": ConfigRecord({"ok": True})}), reply_to=msg)
