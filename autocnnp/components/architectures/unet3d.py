"""3D U-Net for volumetric segmentation (Cicek et al., 2016; nnU-Net's 3D full-resolution network)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from autocnnp.core.settings import setting
from autocnnp.generator.registry import component

from .unet import Norm, UNet, UNetConfig


@dataclass
class VolumeConfig(UNetConfig):
    """The settings of the 3D U-Nets: patches ``[C, D, H, W]`` in, logits ``[K, D, H, W]`` out."""

    dimensions: ClassVar[int] = 3
    norm: Norm = setting("instance", help="normalisation after every convolution: instance, batch, group or none")
    deep_supervision: bool = setting(False, help="also train on the logits of the decoder's lower levels, "
                                                 "against downsampled labels, with weights halving per level")


@dataclass
class Config(VolumeConfig):
    pass


@component("unet3d")
def build(config: Config, *, in_channels: int, num_classes: int) -> UNet:
    """3D U-Net (Cicek et al.): 3x3x3 convolutions, instance norm, optional deep supervision."""
    return UNet(in_channels, num_classes, dims=3, **asdict(config))
