"""The Flower apps (``flower/pyproject.toml`` points here)::

serverapp = "fcl_lightning.flower.apps:server_app"
clientapp = "fcl_lightning.flower.apps:client_app"
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

# torch and the project load inside the handlers: a ClientApp that relays to the node's
# worker (node config ``worker``) never imports them, so its per-message process starts fast

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    import sys

    from fcl_lightning.errors import UserError
    from fcl_lightning.flower.server import run_server

    try:
        run_server(grid, dict(context.run_config))
    except UserError as exc:  # bad config or a site's bad data: one line on the server's console
        sys.stderr.write(f"error: {exc}\n")
        raise


def answer(kind: str, msg: Message, context: Context) -> Message:
    """The reply to ``msg``: from the node's long-lived worker when the node config names one
    (:mod:`fcl_lightning.flower.worker`), else computed in this process."""
    if context.node_config.get("worker"):
        from fcl_lightning.flower.worker import relay

        return Message(relay(kind, msg.content, context), reply_to=msg)
    from fcl_lightning.flower.client import REPLIES

    return Message(REPLIES[kind](msg.content, context), reply_to=msg)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return answer("train", msg, context)


@client_app.query("info")
def _info(msg: Message, context: Context) -> Message:
    return answer("query", msg, context)
