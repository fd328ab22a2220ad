"""Lightning layer: thin modules wiring the algorithm pieces to Lightning's training loop."""

from fcl_lightning.lit.base import FederatedModule
from fcl_lightning.lit.pretrain import ContrastivePretrainModule
from fcl_lightning.lit.segment import SegmentationModule

__all__ = ["FederatedModule", "ContrastivePretrainModule", "SegmentationModule"]
