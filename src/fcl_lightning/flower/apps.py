"""The Flower apps (``flower/pyproject.toml`` points here)::

serverapp = "fcl_lightning.flower.apps:server_app"
clientapp = "fcl_lightning.flower.apps:client_app"
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fcl_lightning.flower.client import handle_query, handle_train
from fcl_lightning.flower.server import run_server

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    run_server(grid, dict(context.run_config))


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)


@client_app.query("info")
def _info(msg: Message, context: Context) -> Message:
    return handle_query(msg, context)
