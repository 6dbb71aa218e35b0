"""A large user architecture for benchmarks/scale_validation.py (15 M parameters, 61 MB of fp32
gradients a step): a strided stem down to 1/8 of the input, five 3x3 convolutions of 512 channels there
(where a small input keeps them cheap), then up to the input's size.
``<CNN_archi><path>scale_large_net.py</path></CNN_archi>``."""

from torch import nn


def build(in_channels: int, num_classes: int) -> nn.Module:
    wide = [layer for _ in range(5) for layer in (nn.Conv2d(512, 512, 3, padding=1), nn.ReLU())]
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 256, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(256, 512, 3, stride=2, padding=1), nn.ReLU(),
        *wide,
        nn.ConvTranspose2d(512, 64, 8, stride=8), nn.ReLU(),
        nn.Conv2d(64, num_classes, 1),
    )
