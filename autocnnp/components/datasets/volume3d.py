"""The decathlon format's 3D volume transform (``dimension=3d``): what ``autocnnp predict`` does to a volume for a
network trained on 3D patches. A volume is pre-processed as the training cases were (z-scored, resampled to the
training's target spacing: :func:`autocnnp.data.resample.preprocess_volume`), run whole through a sliding window of
the training's patch size, and its class probabilities resampled back to the volume's own grid, where the argmax
is taken."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autocnnp.core.errors import DataError
from autocnnp.data.resample import preprocess_volume, to_source_both
from autocnnp.data.slices import select_modalities
from autocnnp.data.volumes import header_spacing
from autocnnp.generator.protocols import VolumePrediction, VolumeTransform

from .inputs import DatasetInputs


@dataclass(frozen=True)
class PatchTransform(DatasetInputs, VolumeTransform):
    """Volumes resampled to ``spacing`` ``(x, y, z)`` mm, through windows of ``patch`` ``(D, H, W)`` overlapping by
    ``overlap``."""

    patch: tuple[int, int, int]
    spacing: tuple[float, float, float]
    overlap: float
    modalities: list[int] | None
    normalise: bool
    default_input: Path | None  # what predict reads when given no --input: the job's <test>, else its <train>
    num_classes: int | None  # the labels the training data declares, if it declares them
    channel_names: tuple[str, ...] | None = None  # the modalities the model reads, by dataset.json's names

    def card(self) -> dict:
        """What a checkpoint records of this transform (``from_card`` rebuilds it)."""
        return {"dimension": "3d", "patch_size": list(self.patch), "spacing": list(self.spacing),
                "overlap": self.overlap, "modalities": self.modalities, "normalise": self.normalise,
                "channel_names": self.channel_names}

    @classmethod
    def from_card(cls, card: dict, num_classes: int | None) -> PatchTransform:
        names = card.get("channel_names")
        return cls(tuple(int(s) for s in card["patch_size"]), tuple(float(s) for s in card["spacing"]),
                   float(card["overlap"]), card["modalities"], bool(card["normalise"]), None, num_classes,
                   tuple(names) if names else None)

    def describe(self) -> str:
        return (f"volumes resampled to {'x'.join(f'{s:g}' for s in self.spacing)} mm, sliding windows of "
                f"{'x'.join(map(str, self.patch))} overlapping by {self.overlap:g}, Gaussian-weighted")

    def input_channels(self, channels: int, where: Path) -> int:
        try:
            select_modalities(np.zeros((1, 1, 1, channels), np.float32), self.modalities)
        except ValueError as exc:
            raise DataError(where, str(exc), "predict on images with the modalities the model was trained on") from None
        return channels if self.modalities is None else len(self.modalities)

    def predict(self, image, img, where: Path, predictor, keep: bool) -> VolumePrediction:
        start = time.perf_counter()
        self.input_channels(image.shape[3] if image.ndim == 4 else 1, where)
        volume = preprocess_volume(image, header_spacing(where, img), self.spacing, self.modalities, self.normalise)
        prepared = time.perf_counter()
        probs, network, windows = predictor.volume(volume, self.patch, self.overlap)
        del volume
        back = time.perf_counter()
        grid = image.shape[:3]
        labels, kept = to_source_both(probs, grid, keep=keep)  # one pass back, both from the same resampling
        kept = kept.transpose(3, 0, 1, 2) if kept is not None else None
        return VolumePrediction(labels, kept, windows, "window", prepared - start, network, time.perf_counter() - back)
