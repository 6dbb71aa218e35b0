"""``<data format="synthetic">``: seeded in-memory slices (no files), for the demo and tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset, Subset

from autocnnp.data.datasets import SyntheticSliceDataset
from autocnnp.run.world import World

# kind -> (input channels, classes), as the Decathlon tasks the thesis trained on.
SHAPES = {"brain": (4, 4), "atrium": (1, 2)}


@dataclass
class DataBundle:
    """What dataset injection hands to the trainer."""

    train: Dataset
    valid: Dataset
    in_channels: int
    num_classes: int


def build(*, world: World, seed: int, cache_dir: Path, kind: str = "brain", train_samples: int = 64,
          valid_samples: int = 16, size: int = 64, in_memory: bool = True) -> DataBundle:
    channels, classes = SHAPES[kind]
    # One generator (same contrasts), disjoint items: the first samples train, the rest validate.
    full = SyntheticSliceDataset(kind, train_samples + valid_samples, size, channels, classes, seed,
                                 in_memory=in_memory)
    valid = Subset(full, range(train_samples, train_samples + valid_samples))
    return DataBundle(Subset(full, range(train_samples)), valid, channels, classes)
