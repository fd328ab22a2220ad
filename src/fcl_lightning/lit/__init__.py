"""Lightning layer: thin modules wiring the algorithm pieces to Lightning's training loop."""

from fcl_lightning.lit.base import FederatedModule
from fcl_lightning.lit.pretrain import ContrastivePretrainModule

__all__ = ["FederatedModule", "ContrastivePretrainModule"]
