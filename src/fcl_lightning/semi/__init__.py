"""Semi-supervised fine-tuning: the client's own unlabelled slices trained on beside its few
labelled ones (weak-to-strong consistency, UniMatch; a mean teacher; bidirectional copy-paste, BCP). Free of Lightning: the
segmentation module calls these plug-ins from its training step."""

from fcl_lightning.semi.objectives import BCP, EMATeacher, MeanTeacher, SemiSupervised, UniMatch, sigmoid_rampup

__all__ = ["BCP", "EMATeacher", "MeanTeacher", "SemiSupervised", "UniMatch", "sigmoid_rampup"]
