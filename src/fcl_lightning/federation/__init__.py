"""The federated loop: per-client Lightning Trainers, aggregation, feature exchange, round checkpoints."""

from fcl_lightning.federation.client import ClientResult, ClientRuntime, client_step
from fcl_lightning.federation.config import Federation
from fcl_lightning.federation.loop import FederatedLoop

__all__ = ["Federation", "FederatedLoop", "ClientRuntime", "ClientResult", "client_step"]
