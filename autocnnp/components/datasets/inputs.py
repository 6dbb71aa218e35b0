"""What ``autocnnp predict`` reads from a Decathlon-layout input, 2D or 3D: the cases of a dataset, a folder of
NIfTI images or one image, and the names of the channels a model reads; how a 2D model predicts a volume (its
slices through the network, their probabilities resized back)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from autocnnp.core.errors import DataError
from autocnnp.data.index import Case, case_name, is_dataset, is_nifti, nifti_files, read_dataset
from autocnnp.generator.protocols import VolumePrediction


def channel_names_of(declared: dict[int, str], modalities: list[int] | None) -> tuple[str, ...] | None:
    """The names of the channels a model reads (``modalities``, or all), from dataset.json's ``modality``."""
    if not declared:
        return None
    picked = modalities if modalities is not None else range(len(declared))
    return tuple(str(declared.get(i % len(declared), f"channel {i}")) for i in picked)


class DatasetInputs:
    """The cases a volume transform predicts; the transform has ``modalities`` (the channels its model reads,
    None: all) and ``channel_names`` (their names in the training data's dataset.json, if it names them)."""

    modalities: list[int] | None
    channel_names: tuple[str, ...] | None

    def cases(self, source: Path, split: str) -> list[Case]:
        """The cases to predict: a dataset's ``split``, every NIfTI file in a folder, or one file."""
        if not source.exists():
            raise DataError(source, "input does not exist", "name a dataset folder, a folder of NIfTI images or a file")
        if source.is_file() and is_nifti(source):
            return [Case(case_name(source), source, None)]
        if is_dataset(source):
            ds = read_dataset(source)
            given = channel_names_of(ds.modalities, self.modalities)
            if self.channel_names and given and [n.lower() for n in given] != [n.lower() for n in self.channel_names]:
                raise DataError(ds.index_file, f"the channels the model reads are the modalities {', '.join(given)} "
                                f"here, but it was trained on {', '.join(self.channel_names)}",
                                "predict on data whose dataset.json 'modality' lists the same modalities in the same "
                                "order")
            cases = [Case(c.name, c.image, None) for c in ds.cases(split)]
            if not cases:
                raise DataError(ds.index_file, f"the dataset lists no {split} cases",
                                "pick another --split (test, training or all) or another --input")
            return cases
        if source.is_dir():
            files = nifti_files(source)
            if not files:
                raise DataError(source, "the folder holds no NIfTI images (.nii or .nii.gz) and no dataset.json",
                                "name a Decathlon dataset folder or a folder of images")
            return [Case(name, path, None) for name, path in files.items()]
        raise DataError(source, "is neither a NIfTI image, a dataset index nor a folder",
                        "name a dataset folder, a folder of NIfTI images or a file")


class SlicePrediction:
    """A 2D transform's prediction of a volume: the slices its ``to_slices(image, where)`` makes
    (``[Z, C, size, size]``) through the network, their probabilities resized back to the source's plane and the
    argmax taken."""

    size: int

    def describe(self) -> str:
        return f"slices resized to {self.size} x {self.size}"

    def input_channels(self, channels: int, where: Path) -> int:
        return self.to_slices(np.zeros((1, 1, 1, channels), np.float32), where).shape[1]

    def predict(self, image, img, where: Path, predictor, keep: bool) -> VolumePrediction:
        start = time.perf_counter()
        slices = self.to_slices(image, where)
        prepared = time.perf_counter()
        probs, network = predictor.slices(slices)
        inferred = time.perf_counter()
        labels, grid = predictor.slices_to_source(probs, tuple(image.shape[:2]), keep)  # bilinear, then argmax
        return VolumePrediction(labels, grid, len(slices), "slice", prepared - start, network,
                                time.perf_counter() - inferred)
