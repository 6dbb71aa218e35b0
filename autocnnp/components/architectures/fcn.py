"""FCN-8s on a VGG16 convolutional encoder (Long et al., 2015)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from autocnnp.core.settings import setting
from autocnnp.generator.protocols import SizeRule
from autocnnp.generator.registry import component

from .unet import Norm, check_divisible, conv_norm_relu


@dataclass
class Config:
    width: float = setting(1.0, min=0.01, help="VGG16's channel counts are multiplied by this")
    norm: Norm = setting("none", help="normalisation after every convolution: batch, group or none")

    def input_sizes(self) -> SizeRule:
        """Five 2x2 poolings: sides are multiples of 32."""
        return SizeRule(multiple=32, dimensions=2)


# VGG16 convolution configuration; "M" is a 2x2 max pooling.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _bilinear_upsampler(channels: int, factor: int) -> nn.ConvTranspose2d:
    """Learnable per-class upsampling by ``factor``, initialised to bilinear interpolation."""
    kernel = 2 * factor
    up = nn.ConvTranspose2d(
        channels, channels, kernel, stride=factor, padding=factor // 2, bias=False
    )
    center = factor - 0.5
    ramp = 1 - (torch.arange(kernel, dtype=torch.float32) - center).abs() / factor
    with torch.no_grad():
        up.weight.zero_()
        for c in range(channels):
            up.weight[c, c] = ramp[:, None] * ramp[None, :]
    return up


class FCN(nn.Module):
    """FCN-8s: VGG16 encoder (channels scaled by ``width``) with skip fusion of pool3/pool4/pool5.

    Class scores of pool5 are upsampled x2 and added to those of pool4, the sum
    is upsampled x2 and added to those of pool3, and the result is upsampled x8
    to the input resolution. Input H and W must be multiples of 32. Returns
    logits ``[N, num_classes, H, W]``.
    """

    def __init__(self, in_channels: int, num_classes: int, *, width: float, norm: Norm) -> None:
        super().__init__()
        stages: list[nn.Sequential] = []
        layers: list[nn.Module] = []
        previous = in_channels
        stage_channels = []
        for item in VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                stages.append(nn.Sequential(*layers))
                stage_channels.append(previous)
                layers = []
            else:
                out = max(1, round(item * width))
                layers.extend(conv_norm_relu(previous, out, norm))
                previous = out
        self.stages = nn.ModuleList(stages)
        self.score_pool3 = nn.Conv2d(stage_channels[2], num_classes, 1)
        self.score_pool4 = nn.Conv2d(stage_channels[3], num_classes, 1)
        self.score_pool5 = nn.Conv2d(stage_channels[4], num_classes, 1)
        self.up_pool5 = _bilinear_upsampler(num_classes, 2)
        self.up_pool4 = _bilinear_upsampler(num_classes, 2)
        self.up_final = _bilinear_upsampler(num_classes, 8)

    def encoder(self) -> list[nn.Module]:
        """The VGG16 stages (``freeze="encoder"`` of a pretrained network; protocols.Encoded)."""
        return list(self.stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_divisible(x, 32)
        pools = []
        for stage in self.stages:
            x = stage(x)
            pools.append(x)
        pool3, pool4, pool5 = pools[2:]
        score = self.up_pool5(self.score_pool5(pool5)) + self.score_pool4(pool4)
        score = self.up_pool4(score) + self.score_pool3(pool3)
        return self.up_final(score)


@component("fcn")
def build(config: Config, *, in_channels: int, num_classes: int) -> FCN:
    """FCN-8s on a 16-layer VGG-style encoder, transposed-convolution upsampling."""
    return FCN(in_channels, num_classes, **asdict(config))
