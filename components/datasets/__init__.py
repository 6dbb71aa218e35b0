"""Dataset injection: where training slices come from (``<data format="...">``)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from autocnnp.generator.registry import DATASETS


@dataclass
class SyntheticConfig:
    """An in-memory, seeded 2D dataset: no files, for the demo and quick checks."""

    kind: Literal["brain", "atrium"] = "brain"
    train_samples: int = field(default=64, metadata={"min": 1})
    valid_samples: int = field(default=16, metadata={"min": 1})
    size: int = field(default=64, metadata={"min": 8})
    in_memory: bool = True  # generate every slice once, up front (False: on every access, no memory)


@dataclass
class DecathlonConfig:
    """NIfTI volumes in the Medical Segmentation Decathlon layout (or a CSV of image,label pairs), or a
    slice cache already built by ``autocnnp preprocess`` (a folder holding its ``meta.json``)."""

    train: Path | None = field(default=None, metadata={"must_exist": True})
    valid: Path | None = field(default=None, metadata={"must_exist": True})
    test: Path | None = field(default=None, metadata={"must_exist": True})
    slices_per_volume: int = field(default=70, metadata={"min": 1})
    slice_mode: Literal["even", "labelled"] = "labelled"
    size: int = field(default=128, metadata={"min": 8})
    modalities: str = "all"
    valid_fraction: float = field(default=0.2, metadata={"min": 0.0, "max": 0.9})
    augment: bool = True
    normalise: bool = True
    cache: Path | None = None
    in_memory: bool = False  # read the slice cache into memory (else memory-mapped: bounded memory)

    def __post_init__(self):
        if self.train is None:
            raise ValueError("<data> needs <train><path>...</path></train> pointing at the training data")


DATASETS.register("synthetic", "autocnnp.components.datasets.synthetic:build", SyntheticConfig,
                  "seeded synthetic 2D slices generated in memory (brain-tumour-like or left-atrium-like)")
DATASETS.register("decathlon", "autocnnp.components.datasets.decathlon:build", DecathlonConfig,
                  "Decathlon-layout NIfTI (dataset.json, imagesTr, labelsTr) sliced and cached on disk")
