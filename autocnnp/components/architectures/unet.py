"""2D U-Net for semantic segmentation (Ronneberger et al., 2015)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from autocnnp.core.settings import setting
from autocnnp.generator.protocols import SizeRule
from autocnnp.generator.registry import component

Norm = Literal["batch", "group", "none"]


@dataclass
class Config:
    depth: int = setting(4, min=1, max=8, help="resolution levels; input sides must be multiples of 2^(depth-1)")
    base_channels: int = setting(32, min=1, help="channels of the first level, doubled at every level")
    norm: Norm = setting("batch", help="normalisation after every convolution: batch, group or none")

    def input_sizes(self) -> SizeRule:
        """Each of the depth - 1 poolings halves the sides, and the decoder doubles them back."""
        return SizeRule(multiple=2 ** (self.depth - 1))


def conv_norm_relu(in_channels: int, out_channels: int, norm: Norm) -> list[nn.Module]:
    """3x3 convolution (padding 1), optional normalisation, ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm == "none")
    ]
    if norm == "batch":
        layers.append(nn.BatchNorm2d(out_channels))
    elif norm == "group":
        layers.append(nn.GroupNorm(math.gcd(8, out_channels), out_channels))
    layers.append(nn.ReLU(inplace=True))
    return layers


def check_divisible(x: torch.Tensor, multiple: int) -> None:
    """Raise ValueError unless the input height and width are multiples of ``multiple``."""
    height, width = x.shape[-2:]
    if height % multiple or width % multiple:
        raise ValueError(
            f"input height and width must be multiples of {multiple}, got {height}x{width}"
        )


def _double_conv(in_channels: int, out_channels: int, norm: Norm) -> nn.Sequential:
    return nn.Sequential(
        *conv_norm_relu(in_channels, out_channels, norm),
        *conv_norm_relu(out_channels, out_channels, norm),
    )


class UNet(nn.Module):
    """U-Net with ``depth`` resolution levels; channels double per level.

    Input H and W must be multiples of ``2 ** (depth - 1)``. Returns logits
    ``[N, num_classes, H, W]``.
    """

    def __init__(self, in_channels: int, num_classes: int, *, depth: int, base_channels: int, norm: Norm) -> None:
        super().__init__()
        channels = [base_channels * 2**level for level in range(depth)]
        self.multiple = 2 ** (depth - 1)
        self.down = nn.ModuleList()
        previous = in_channels
        for c in channels:
            self.down.append(_double_conv(previous, c, norm))
            previous = c
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(channels[level + 1], channels[level], 2, stride=2)
            for level in reversed(range(depth - 1))
        )
        self.up_conv = nn.ModuleList(
            _double_conv(2 * channels[level], channels[level], norm)
            for level in reversed(range(depth - 1))
        )
        self.head = nn.Conv2d(channels[0], num_classes, 1)

    def encoder(self) -> list[nn.Module]:
        """The contracting path (``freeze="encoder"`` of a pretrained network; protocols.Encoded)."""
        return list(self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_divisible(x, self.multiple)
        skips = []
        for level, block in enumerate(self.down):
            if level:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()
        for up, conv in zip(self.up, self.up_conv):
            x = conv(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


@component("unet")
def build(config: Config, *, in_channels: int, num_classes: int) -> UNet:
    """2D U-Net (Ronneberger et al.) with configurable depth and width."""
    return UNet(in_channels, num_classes, **asdict(config))
