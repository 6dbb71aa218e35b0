"""``<data format="synthetic">``: seeded 2D slices generated in memory (no files), for the demo and tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from autocnnp.core.settings import setting
from autocnnp.core.world import World
from autocnnp.data.synth import ATRIUM_LABELS, BRAIN_LABELS
from autocnnp.generator.protocols import DataBundle, DataFormat
from autocnnp.generator.registry import component

# kind -> (input channels, classes), as the Decathlon tasks the thesis trained on.
SHAPES = {"brain": (4, 4), "atrium": (1, 2)}


@dataclass
class Config:
    """An in-memory, seeded 2D dataset: no files, for the demo and quick checks."""

    kind: Literal["brain", "atrium"] = setting("brain", help="brain: 4 channels, 4 nested classes; atrium: 1 "
                                                             "channel, a thin ring")
    train_samples: int = setting(64, min=1, help="training slices")
    valid_samples: int = setting(16, min=1, help="validation slices")
    size: int = setting(64, min=8, help="slice side in pixels")
    in_memory: bool = setting(True, help="generate every slice once, up front (false: on every access, no memory)")

    def input_size(self) -> tuple[int, ...]:
        return (self.size, self.size)


@component("synthetic", frameworks=("torch", "tensorflow"))
class Synthetic(DataFormat):
    """Seeded synthetic 2D slices generated in memory (brain-tumour-like or left-atrium-like)."""

    def datasets(self, *, world: World, seed: int, cache_dir: Path) -> DataBundle:
        from torch.utils.data import Subset  # torch only where the data is built, not in the front-end

        from autocnnp.data.synthetic_slices import SyntheticSliceDataset

        del world, cache_dir  # every rank generates the same items; nothing is cached
        c = self.config
        channels, classes = SHAPES[c.kind]
        # One generator (same contrasts), disjoint items: the first samples train, the rest validate.
        full = SyntheticSliceDataset(c.kind, c.train_samples + c.valid_samples, c.size, channels, classes, seed,
                                     in_memory=c.in_memory)
        names = BRAIN_LABELS if c.kind == "brain" else ATRIUM_LABELS  # as the NIfTI datasets `autocnnp synth` writes
        return DataBundle(Subset(full, range(c.train_samples)),
                          Subset(full, range(c.train_samples, c.train_samples + c.valid_samples)), channels, classes,
                          class_names=tuple(names[str(i)] for i in range(classes)))

    def train_samples(self) -> int:
        return self.config.train_samples
