"""The baselines of the FCL paper's Tables 1 and 2 as objective plug-ins on the same module and
federated loop (``model.init_args.objective.class_path``); configs in ``configs/methods/``."""

from fcl_lightning.baselines.partition_cl import PartitionContrastObjective
from fcl_lightning.baselines.rotation import RotationObjective
from fcl_lightning.baselines.simclr import SimCLRObjective
from fcl_lightning.baselines.swav import SwAVObjective, sinkhorn

__all__ = ["PartitionContrastObjective", "RotationObjective", "SimCLRObjective", "SwAVObjective", "sinkhorn"]
