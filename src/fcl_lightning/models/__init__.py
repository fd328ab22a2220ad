"""Networks: the U-Net encoder shared by pre-training and segmentation, heads, the U-Net."""

from fcl_lightning.models.encoder import ProjectionHead, UNetEncoder
from fcl_lightning.models.unet import UNet

__all__ = ["UNetEncoder", "ProjectionHead", "UNet"]
