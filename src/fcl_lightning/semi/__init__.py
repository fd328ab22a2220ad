"""Semi-supervised fine-tuning: the client's own unlabelled slices trained on beside its few
labelled ones (weak-to-strong consistency, UniMatch; a mean teacher). Free of Lightning: the
segmentation module calls these plug-ins from its training step."""

from fcl_lightning.semi.objectives import MeanTeacher, SemiSupervised, UniMatch, sigmoid_rampup

__all__ = ["MeanTeacher", "SemiSupervised", "UniMatch", "sigmoid_rampup"]
