"""3D residual U-Net (the 3D-ResUNet of the federated glioblastoma study, trained there through GaNDLF)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from autocnnp.generator.registry import component

from .unet import UNet
from .unet3d import VolumeConfig


@dataclass
class Config(VolumeConfig):
    pass


@component("resunet3d")
def build(config: Config, *, in_channels: int, num_classes: int) -> UNet:
    """3D residual U-Net: every level's two convolutions bypassed by an identity (or 1x1) connection."""
    return UNet(in_channels, num_classes, dims=3, residual=True, **asdict(config))
