"""fcl-lightning: Federated Contrastive Learning (Wu et al., MICCAI 2021) on PyTorch Lightning."""

__version__ = "0.1.0"
