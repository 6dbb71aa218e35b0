"""2D U-Net for semantic segmentation (Ronneberger et al., 2015), and the blocks the 3D U-Nets share with it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from autocnnp.core.settings import setting
from autocnnp.generator.protocols import SizeRule
from autocnnp.generator.registry import component

Norm = Literal["batch", "instance", "group", "none"]


@dataclass
class UNetConfig:
    """The settings every U-Net shares, 2D or 3D."""

    depth: int = setting(4, min=1, max=8, help="resolution levels; input sides must be multiples of 2^(depth-1)")
    base_channels: int = setting(32, min=1, help="channels of the first level, doubled at every level")
    dimensions: ClassVar[int] = 2

    def input_sizes(self) -> SizeRule:
        """Each of the depth - 1 poolings halves the sides, and the decoder doubles them back; instance norm (the
        subclasses' ``norm``) needs two voxels or more at the deepest level."""
        instance = self.norm == "instance"  # type: ignore[attr-defined]
        return SizeRule(multiple=2 ** (self.depth - 1), dimensions=self.dimensions, deepest_voxels=2 if instance else 1,
                        reason=f"depth {self.depth}, instance norm: one voxel has no variance" if instance else "")


@dataclass
class Config(UNetConfig):
    norm: Norm = setting("batch", help="normalisation after every convolution: batch, instance, group or none")


CONV = {2: nn.Conv2d, 3: nn.Conv3d}
UP = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def conv_norm_relu(in_channels: int, out_channels: int, norm: Norm, dims: int = 2) -> list[nn.Module]:
    """3x3 (3x3x3) convolution (padding 1), optional normalisation, ReLU."""
    layers: list[nn.Module] = [
        CONV[dims](in_channels, out_channels, 3, padding=1, bias=norm == "none")
    ]
    if norm == "batch":
        layers.append(BATCH_NORM[dims](out_channels))
    elif norm == "instance":
        layers.append(INSTANCE_NORM[dims](out_channels, affine=True))
    elif norm == "group":
        layers.append(nn.GroupNorm(math.gcd(8, out_channels), out_channels))
    layers.append(nn.ReLU(inplace=True))
    return layers


def check_divisible(x: torch.Tensor, multiple: int, dims: int = 2) -> None:
    """Raise ValueError unless every spatial side of the input is a multiple of ``multiple``."""
    sides = tuple(x.shape[-dims:])
    if any(side % multiple for side in sides):
        names = "height and width" if dims == 2 else "depth, height and width"
        raise ValueError(f"input {names} must be multiples of {multiple}, got {'x'.join(map(str, sides))}")


def double_conv(in_channels: int, out_channels: int, norm: Norm, dims: int) -> nn.Module:
    """Two convolution-normalisation-ReLU layers (the U-Net's block)."""
    return nn.Sequential(
        *conv_norm_relu(in_channels, out_channels, norm, dims),
        *conv_norm_relu(out_channels, out_channels, norm, dims),
    )


class Residual(nn.Module):
    """Two convolution-normalisation layers plus the input (a 1x1 projection when the channels change), then
    ReLU (He et al.; the residual U-Net's block)."""

    def __init__(self, in_channels: int, out_channels: int, norm: Norm, dims: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_norm_relu(in_channels, out_channels, norm, dims),
            *conv_norm_relu(out_channels, out_channels, norm, dims)[:-1],
        )
        self.skip = nn.Identity() if in_channels == out_channels else CONV[dims](in_channels, out_channels, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.skip(x))


class UNet(nn.Module):
    """U-Net with ``depth`` resolution levels in ``dims`` (2 or 3) spatial dimensions; channels double per level.

    Input sides must be multiples of ``2 ** (depth - 1)``. Returns logits ``[N, num_classes, *sides]``. With
    ``residual`` every level's block is a residual one (the residual U-Net). With ``deep_supervision``, a training
    forward returns a tuple: the logits, then those of every decoder level above the lowest (each at half the
    previous one's resolution); the losses (autocnnp.training.losses) take such a tuple. In eval mode only the
    logits are returned.
    """

    def __init__(self, in_channels: int, num_classes: int, *, depth: int, base_channels: int, norm: Norm,
                 dims: int = 2, residual: bool = False, deep_supervision: bool | None = None) -> None:
        super().__init__()
        channels = [base_channels * 2**level for level in range(depth)]
        block = Residual if residual else double_conv
        self.multiple, self.dims = 2 ** (depth - 1), dims
        self.down = nn.ModuleList()
        previous = in_channels
        for c in channels:
            self.down.append(block(previous, c, norm, dims))
            previous = c
        self.pool = POOL[dims](2)
        self.up = nn.ModuleList(
            UP[dims](channels[level + 1], channels[level], 2, stride=2)
            for level in reversed(range(depth - 1))
        )
        self.up_conv = nn.ModuleList(
            block(2 * channels[level], channels[level], norm, dims)
            for level in reversed(range(depth - 1))
        )
        self.head = CONV[dims](channels[0], num_classes, 1)
        if deep_supervision:  # a 1x1 head on decoder levels 1 .. depth - 2
            self.auxiliary = nn.ModuleList(CONV[dims](channels[level], num_classes, 1) for level in range(1, depth - 1))

    def encoder(self) -> list[nn.Module]:
        """The contracting path (``freeze="encoder"`` of a pretrained network; protocols.Encoded)."""
        return list(self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        check_divisible(x, self.multiple, self.dims)
        skips = []
        for level, block in enumerate(self.down):
            if level:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()
        auxiliary = getattr(self, "auxiliary", None) if self.training else None
        outputs = []
        for level, up, conv in zip(reversed(range(len(self.up))), self.up, self.up_conv):
            x = conv(torch.cat([skips.pop(), up(x)], dim=1))
            if auxiliary is not None and level:
                outputs.append(auxiliary[level - 1](x))
        if auxiliary is None:
            return self.head(x)
        return (self.head(x), *reversed(outputs))


@component("unet")
def build(config: Config, *, in_channels: int, num_classes: int) -> UNet:
    """2D U-Net (Ronneberger et al.) with configurable depth and width."""
    return UNet(in_channels, num_classes, **asdict(config))
