"""A small user architecture for benchmarks/scale_validation.py (about 30 k parameters): two strided
convolutions down, two transposed convolutions up. ``<CNN_archi><path>scale_small_net.py</path></CNN_archi>``."""

from torch import nn


def build(in_channels: int, num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 48, 3, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(48, 32, 2, stride=2), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 2, stride=2), nn.ReLU(),
        nn.Conv2d(16, num_classes, 1),
    )
