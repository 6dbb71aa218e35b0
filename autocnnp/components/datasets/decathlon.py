"""``<data format="decathlon">``: NIfTI volumes (Decathlon layout or a CSV index) as cached 2D slices.

What :meth:`Decathlon.datasets` does, on every rank (all steps are safe to run concurrently):

1. **Validate** the training (and validation) dataset with :func:`~autocnnp.data.checks.validate_once`
   -- every file readable, shapes, affines, labels -- and raise a DataError naming the first problems,
   so a bad file stops the job before any rank trains. One rank validates while the others wait on a
   lock; the verdict is stamped so the others, and later runs on unchanged data, reuse it.
2. **Cache** the slices once with :func:`~autocnnp.data.preprocess.build_cache` (modality selection,
   ``slices_per_volume`` slices per case, z-score, resize to ``size``) under ``cache`` if the job sets
   it, else under the run's ``cache`` folder. Each cache lives in a sub-folder named after its dataset
   and parameters (``train-<hash>``, ``valid-<hash>``), so jobs that share a ``cache`` folder with
   other parameters do not overwrite each other's caches.
3. **Split** by case: a ``<valid>`` dataset gets its own cache; otherwise the last ``valid_fraction``
   of the training cases (at least one, in index order, deterministic) are held out for validation, or
   with ``folds`` k the cases of fold ``fold`` of a k-fold split (data/folds.py; ``autocnnp study``).
   Slices of one case never land on both sides. With ``validation=volumes`` (the default) the
   validation cache holds every slice of the validation volumes, so the validation metrics are those
   of whole volumes (the validation loader spreads the slices over the ranks and their confusion
   counts are summed); ``validation=slices`` samples them as the training slices are.
4. **Augment** the training minibatches on the training device with
   :meth:`~autocnnp.data.augment.RandomAffine2D.batch` (thesis Table 2.1: rotation +-45 degrees, zoom
   0.8-1.2, shifts up to 5 % of the slice size; optionally flips and intensity changes), seeded with the
   job's seed, the epoch and each slice's index.

With ``dimension=3d`` the format trains on 3D patches instead (issue 22): every case is z-scored and
resampled to one target ``spacing`` (default: the training cases' median) into a volume cache
(:func:`~autocnnp.data.volumes3d.build_volume_cache`, as content-keyed and shared as the slice cache);
``patches_per_volume`` patches of ``patch_size`` per training case and epoch are read from it
(:class:`~autocnnp.data.volumes3d.PatchDataset`: a ``foreground_share`` of them centred on a voxel of a
class the case holds), augmented on the device by :class:`~autocnnp.data.augment.RandomAffine3D`; each
rank validates whole resampled volumes of its share of the validation cases with a sliding window
(:class:`~autocnnp.training.sliding_window.SlidingWindow`, ``valid_overlap``). ``patch_size=auto`` is
the median resampled shape rounded down to multiples of 16 (a depth-5 U-Net takes it), shrunk to at most
``patch_budget`` voxels. Cases smaller than the patch are padded with zeros (said once, before the
ranks start); a case that resampling would blow beyond ``volume_budget_mb`` stops the job, named.

``in_channels`` is the number of selected modalities; ``num_classes`` the number of labels that
``dataset.json`` declares (for a CSV index: the largest label value in the cache + 1). ``<test>`` is
not used for training; ``autocnnp predict`` reads it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from autocnnp.core.errors import DataError
from autocnnp.core.files import read_json
from autocnnp.core.settings import setting
from autocnnp.core.world import World
from autocnnp.data import folds
from autocnnp.data import slices as slicing
from autocnnp.data.augment import RandomAffine2D, RandomAffine3D
from autocnnp.data.checks import Verdict, check_dataset, validate_once
from autocnnp.data.index import read_dataset
from autocnnp.data.preprocess import CacheDataset, build_cache, cache_key, cache_key_of, check_cache, is_cache, training_cases
from autocnnp.data.slices import parse_modalities, resize, select_modalities, zscore_stats, zscored
from autocnnp.data.spacing import target_spacing
from autocnnp.data.volumes3d import PatchDataset, VolumeDataset, build_volume_cache, plan_cases
from autocnnp.generator.protocols import DataBundle, DataCheck, DataFormat, VolumeTransform
from autocnnp.generator.registry import component
from autocnnp.training.sliding_window import SlidingWindow

from .inputs import DatasetInputs, SlicePrediction, channel_names_of

# Thesis Table 2.1 (left atrium): rotation [-45, 45] degrees, zoom [0.8, 1.2], shifts of 25.6 px
# on 512 px slices = 5 % of the slice size (Keras width_shift_range / height_shift_range).
AUGMENT_ROTATION = 45.0
AUGMENT_ZOOM = (0.8, 1.2)
AUGMENT_TRANSLATE = 0.05
# 3D patches (nnU-Net-like): rotation about the depth axis, zoom; no shifts (the patch position is random already)
AUGMENT_ROTATION_3D = 15.0
AUGMENT_ZOOM_3D = (0.85, 1.25)


@dataclass
class Config:
    """NIfTI volumes in the Medical Segmentation Decathlon layout (or a CSV of image,label pairs), or a
    slice cache already built by ``autocnnp preprocess`` (a folder holding its ``meta.json``)."""

    train: Path | None = setting(None, must_exist=True, help="training data: dataset folder, dataset.json, CSV "
                                                             "or slice cache")
    valid: Path | None = setting(None, must_exist=True, help="validation data (default: a share of the training "
                                                             "cases)")
    test: Path | None = setting(None, must_exist=True, help="test images, read by autocnnp predict")
    slices_per_volume: int = setting(70, min=0, help="2D slices taken per volume (0: every slice)")
    slice_mode: Literal["mixed", "even", "labelled"] = setting(
        "mixed", help="mixed: foreground_fraction of the slices from those holding a label, the rest from those "
                      "holding none; even: over the whole volume; labelled: over its labelled part only")
    foreground_fraction: float = setting(0.67, min=0.0, max=1.0, help="share of labelled slices in mixed mode "
                                                                      "(benchmarks/slice_sampling.py)")
    size: int = setting(128, min=8, help="slice side in pixels after resizing")
    modalities: str = setting("all", help="'all' or comma-separated modality names or channel indices")
    valid_fraction: float = setting(0.2, min=0.0, max=0.9, help="share of the training cases held out for "
                                                                "validation when there is no <valid>")
    folds: int = setting(0, min=0, help="k-fold cross-validation: the number of folds, split by case and stratified "
                                        "by the classes a case holds (autocnnp study trains them all); 0: valid_fraction")
    fold: int = setting(0, min=0, help="with folds: the fold held out for validation (0 .. folds-1)")
    split_seed: int = setting(0, help="with folds: the seed of the k-fold split's shuffle")
    split: Path | None = setting(None, help="with folds: the split file to read (written once by autocnnp study, "
                                            "refused if the data changed); default: the split made anew")
    validation: Literal["volumes", "slices"] = setting("volumes", help="score every slice of the validation "
                                                                       "volumes, or only slices sampled as for training")
    augment: bool = setting(True, help="random rotation, zoom and shift of the training slices (thesis Table 2.1)")
    augment_flips: bool = setting(False, help="with augment: also mirror each axis of a slice with probability 1/2")
    augment_intensity: float = setting(0.0, min=0.0, help="with augment: also scale and shift the intensities by factors "
                                                  "1 + u and v, u, v uniform in [-intensity, intensity] (z-score units)")
    normalise: bool = setting(True, help="z-score every case and channel over its non-zero voxels")
    augment_gamma: float = setting(0.0, min=0.0, max=0.9, help="with augment: also raise each item's intensities "
                                   "(mapped to [0, 1]) to a power log-uniform in [1 - gamma, 1 / (1 - gamma)]")
    dimension: Literal["2d", "3d"] = setting("2d", help="2d: train on cached slices; 3d: on patches of resampled "
                                                        "volumes (the settings below marked 3D)")
    patch_size: str = setting("auto", help="3D: patch 'D,H,W' in voxels, D along the volume's third axis, or 'auto' "
                                           "(the median resampled shape, multiples of 16, within patch_budget)")
    patch_budget: int = setting(128 ** 3, min=1, help="3D: most voxels of an automatic patch")
    spacing: str = setting("median", help="3D: target voxel spacing 'x,y,z' in mm, or 'median' (of the training "
                                          "cases, as nnU-Net)")
    foreground_share: float = setting(0.33, min=0.0, max=1.0, help="3D: share of the patches centred on a voxel of "
                                      "a class the case holds (nnU-Net's 0.33), the rest anywhere")
    patches_per_volume: int = setting(8, min=1, help="3D: training patches per training case and epoch")
    valid_overlap: float = setting(0.5, min=0.0, max=0.95, help="3D: overlap of the sliding windows that validate "
                                                                "whole volumes")
    volume_budget_mb: int = setting(2048, min=1, help="3D: most MiB (float32, all channels) a case may take once "
                                                      "resampled; a larger one stops the job before it starts")
    cache: Path | None = setting(None, help="slice cache folder (default: the run's cache folder)")
    in_memory: bool = setting(False, help="read the slice cache into memory (else memory-mapped: bounded memory)")

    def __post_init__(self):
        if self.train is None:
            raise ValueError("<data> needs <train><path>...</path></train> pointing at the training data")
        if self.folds == 1 or (self.folds and self.fold >= self.folds):
            raise ValueError(f"fold {self.fold} of {self.folds} folds: give folds >= 2 and fold 0 .. folds-1 "
                             "(folds 0 holds out valid_fraction)")

    def input_size(self) -> tuple[int, ...]:
        """The slices' sides: ``size``, or those a slice cache was built with (its meta.json, read torch-free); in
        3D the patch ``(D, H, W)`` (from the training cases' headers)."""
        if self.dimension == "3d":
            from autocnnp.data.index import read_dataset
            from autocnnp.data.spacing import patch_of

            return patch_of(read_dataset(self.train).cases("training"), self.patch_size, self.spacing,
                            self.patch_budget, self.train)
        meta = read_json(Path(self.train) / "meta.json") or {}  # data.preprocess.META_FILE
        size = meta.get("size")
        return tuple(size) if isinstance(size, list) and all(isinstance(s, int) for s in size) else (self.size, self.size)


def split_cases(names: list[str], valid_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the last ``valid_fraction`` of the cases (at least one, and at least one left to train on)."""
    n = len(names)
    if n < 2:
        raise ValueError(f"{n} labelled case(s) cannot be split into training and validation cases")
    n_valid = min(n - 1, max(1, int(round(n * float(valid_fraction)))))
    return list(names[: n - n_valid]), list(names[n - n_valid:])


def class_names(labels: dict, num_classes: int) -> tuple[str, ...]:
    """The name of every class value 0..num_classes-1 from dataset.json's labels (``class 2`` if unnamed)."""
    named = {int(k): str(v) for k, v in labels.items() if str(k).lstrip("-").isdigit()}
    return tuple(named.get(i, f"class {i}") for i in range(num_classes))


def _num_classes(meta: dict) -> int:
    declared = len(meta.get("labels") or {})
    present = len(meta.get("label_counts") or [])
    return max(2, declared or present)


def _built(cache_root: Path, role: str, params: dict, kind: str, rank: int, build) -> Path:
    """The cache folder ``cache_root/<role>-<hash of params>``, filled by ``build(folder)``; rank 0 says where
    when that took long."""
    folder = Path(cache_root) / f"{role}-{cache_key(params)[:12]}"
    start = time.perf_counter()
    build(folder)
    took = time.perf_counter() - start
    if rank == 0 and took > 2.0:
        print(f"autocnnp: {role} {kind} cache ready in {folder} ({took:.1f} s)", file=sys.stderr, flush=True)
    return folder


@component("decathlon", frameworks=("torch", "tensorflow"))
class Decathlon(DataFormat):
    """Decathlon-layout NIfTI (dataset.json, imagesTr, labelsTr) sliced and cached on disk."""

    def _cache(self, cache_root: Path, role: str, root, cases: list[int] | None, every_slice: bool, rank: int) -> Path:
        """Build (or find) the slice cache of ``cases`` (positions in the index; None: all) of ``root`` in
        ``cache_root/<role>-<hash>``: one folder per dataset, cases and pre-processing parameters."""
        c = self.config
        n_slices, mode = (None, "even") if every_slice else (c.slices_per_volume, c.slice_mode)  # even & None: all
        params = {"root": str(Path(root).resolve()), "slices": n_slices, "mode": mode, "size": c.size,
                  "foreground_fraction": c.foreground_fraction,
                  "modalities": parse_modalities(c.modalities), "normalise": bool(c.normalise), "cases": cases}
        return _built(cache_root, role, params, "slice", rank, lambda folder: build_cache(
            root, folder, n_slices=n_slices, size=c.size, modalities=parse_modalities(c.modalities), mode=mode,
            normalise=c.normalise, case_indices=cases, foreground_fraction=c.foreground_fraction, progress=rank == 0))

    def datasets(self, *, world: World, seed: int, cache_dir: Path) -> DataBundle:
        """Validate, cache and split (see the module docstring). A ``train``/``valid`` folder that already is
        a slice cache (``autocnnp preprocess``) is used as it is."""
        c = self.config
        cache_root = Path(c.cache) if c.cache is not None else Path(cache_dir)
        if c.dimension == "3d":
            return self._datasets_3d(world, seed, cache_root)
        empty: list[str] = []
        for role, root in (("train", c.train), ("valid", c.valid)):
            if root is not None:  # a dataset, or a slice cache checked as one
                check = (lambda r=root: check_cache(r)) if is_cache(root) else None
                empty += validate_once(root, cache_root, role, check, cache_key_of(root) if check else None).empty_labels
        volumes = c.validation == "volumes"
        augmenter = RandomAffine2D(rotation=AUGMENT_ROTATION, zoom=AUGMENT_ZOOM, translate=AUGMENT_TRANSLATE,
                                   seed=int(seed), flips=c.augment_flips, intensity=c.augment_intensity,
                                   gamma=c.augment_gamma) if c.augment else None
        if is_cache(c.train):  # preprocessed already: the job reads it as it is, validation from its slices
            full = CacheDataset(c.train, in_memory=False)  # its indices only
            train_ds, valid_ds = self._split_cache(full) if c.valid is None else (
                CacheDataset(c.train, in_memory=c.in_memory), None)
        else:
            train_cases, valid_cases = (None, None) if c.valid is not None else self._split(c.train)
            train_ds = CacheDataset(self._cache(cache_root, "train", c.train, train_cases, False, world.rank),
                                    in_memory=c.in_memory)
            valid_ds = None if valid_cases is None else CacheDataset(
                self._cache(cache_root, "valid", c.train, valid_cases, volumes, world.rank), in_memory=c.in_memory)
        if valid_ds is None:
            valid = Path(c.valid)
            valid_ds = CacheDataset(valid if is_cache(valid) else self._cache(cache_root, "valid", valid, None, volumes,
                                                                              world.rank), in_memory=c.in_memory)
            if valid_ds.num_channels != train_ds.num_channels:
                raise DataError(c.valid, f"validation images have {valid_ds.num_channels} channel(s) after modality "
                                f"selection, training images {train_ds.num_channels}",
                                "give both datasets the same modalities")
        num_classes = max(_num_classes(train_ds.meta), _num_classes(valid_ds.meta))
        return DataBundle(train_ds, valid_ds, train_ds.num_channels, num_classes,
                          augment=augmenter,
                          class_names=class_names(train_ds.meta.get("labels") or {}, num_classes),
                          empty_label_cases=tuple(empty))

    def _datasets_3d(self, world: World, seed: int, cache_root: Path) -> DataBundle:
        """Validate (header spacings too), cache the resampled volumes, patches for training, whole volumes for
        validation (see the module docstring)."""
        c = self.config
        if is_cache(c.train) or (c.valid is not None and is_cache(c.valid)):
            raise DataError(c.train, "a 3D job trains from a dataset, not from a slice cache",
                            "give <train> (and <valid>) a dataset folder, dataset.json or CSV index")
        empty: list[str] = []
        for role, root in (("train3d", c.train), ("valid3d", c.valid)):
            if root is not None:
                empty += validate_once(root, cache_root, role,
                                       lambda r=root: check_dataset(r, split="training", spacing=True)).empty_labels
        cases = read_dataset(c.train).cases("training")
        target = target_spacing(cases, c.spacing, c.train)
        patch = c.input_size()
        train_cases, valid_cases = (None, None) if c.valid is not None else self._split(c.train)
        train_dir = self._volume_cache(cache_root, "train3d", c.train, train_cases, target, world.rank)
        valid_dir = self._volume_cache(cache_root, "valid3d", c.valid if c.valid is not None else c.train,
                                       valid_cases, target, world.rank)
        n_train = len(cases) if train_cases is None else len(train_cases)
        train = PatchDataset(train_dir, patch=patch, length=c.patches_per_volume * n_train,
                             foreground_share=c.foreground_share, seed=int(seed))
        valid = VolumeDataset(valid_dir)
        if valid.num_channels != train.num_channels:
            raise DataError(c.valid, f"validation images have {valid.num_channels} channel(s) after modality "
                            f"selection, training images {train.num_channels}", "give both datasets the same modalities")
        small = [case["name"] for ds in (train, valid) for case in ds.cases
                 if any(n < p for n, p in zip(case["shape"], patch))]
        notes = (f"{len(small)} case(s) are smaller than the patch {'x'.join(map(str, patch))} along some axis once "
                 f"resampled to {target} mm ({', '.join(small[:5])}{' ...' if len(small) > 5 else ''}): they are "
                 "padded with zeros (background)",) if small else ()
        augmenter = RandomAffine3D(rotation=AUGMENT_ROTATION_3D, zoom=AUGMENT_ZOOM_3D, seed=int(seed),
                                   flips=c.augment_flips, intensity=c.augment_intensity,
                                   gamma=c.augment_gamma) if c.augment else None
        num_classes = max(_num_classes(train.meta), _num_classes(valid.meta))
        return DataBundle(train, valid, train.num_channels, num_classes, augment=augmenter,
                          class_names=class_names(train.meta.get("labels") or {}, num_classes),
                          empty_label_cases=tuple(empty), valid_batch_size=1,
                          infer=SlidingWindow(patch, overlap=c.valid_overlap), notes=notes)

    def _volume_cache(self, cache_root: Path, role: str, root, cases: list[int] | None, target, rank: int) -> Path:
        """Build (or find) the volume cache of ``cases`` of ``root`` at ``target`` spacing in
        ``cache_root/<role>-<hash>``."""
        c = self.config
        params = {"root": str(Path(root).resolve()), "spacing": list(target), "normalise": bool(c.normalise),
                  "modalities": parse_modalities(c.modalities), "cases": cases}
        return _built(cache_root, role, params, "volume", rank, lambda folder: build_volume_cache(
            root, folder, target_spacing=target, modalities=parse_modalities(c.modalities), normalise=c.normalise,
            case_indices=cases, budget_bytes=c.volume_budget_mb << 20, progress=rank == 0))

    def _split(self, root) -> tuple[list[int], list[int]]:
        """Positions of the training and the validation cases of dataset ``root``."""
        names = [case.name for case in read_dataset(root).cases("training")]
        c = self.config
        if c.folds:
            split = folds.read_split(c.split, root, c.folds, c.split_seed) if c.split is not None else \
                folds.make_split(root, c.folds, c.split_seed)
            train_names, valid_names = folds.fold_cases(split, names, c.fold)
            return [names.index(n) for n in train_names], [names.index(n) for n in valid_names]
        try:
            train_names, valid_names = split_cases(names, c.valid_fraction)
        except ValueError as exc:
            raise DataError(root, str(exc), "add cases, or name a separate validation dataset with "
                            "<valid><path>...</path></valid>") from None
        return [names.index(n) for n in train_names], [names.index(n) for n in valid_names]

    def _split_cache(self, full: CacheDataset) -> tuple[CacheDataset, CacheDataset]:
        """Training and validation slices of a preprocessed cache, split by case."""
        c = self.config
        names = [case["name"] for case in full.meta["cases"]]
        try:
            train_names, valid_names = folds.fold_cases({"cases": folds.assign_folds(dict.fromkeys(names, ()), c.folds,
                                                                                     c.split_seed)}, names, c.fold) \
                if c.folds else split_cases(names, c.valid_fraction)
        except ValueError as exc:
            raise DataError(c.train, str(exc), "add cases, or name a separate validation dataset with "
                            "<valid><path>...</path></valid>") from None
        return (CacheDataset(c.train, indices=full.indices_of_cases(train_names),
                             in_memory=c.in_memory),
                CacheDataset(c.train, indices=full.indices_of_cases(valid_names), in_memory=c.in_memory))

    def prepare(self, *, seed: int, cache_dir: Path) -> int:
        """Validate, cache and split once, before the ranks start (they find the stamps and caches)."""
        bundle = self.datasets(world=World(), seed=seed, cache_dir=cache_dir)
        for note in (Verdict(empty_labels=list(bundle.empty_label_cases)).note(), *bundle.notes):
            if note:
                print(f"autocnnp: note: {note}", file=sys.stderr, flush=True)
        return len(bundle.train)

    def check(self) -> DataCheck:
        """The training and validation cases' problems stop a job, as ``run`` checks them; a test case's (training
        never reads it, predict would refuse it) and label maps holding background only are notes."""
        c, found = self.config, DataCheck()
        for root, trains in ((c.train, True), (c.valid, True), (c.test, False)):
            if root is None:
                continue
            cache = is_cache(root)
            verdict = check_cache(root) if cache else check_dataset(root, split="training", spacing=c.dimension == "3d") \
                if trains else Verdict()
            found.problems += verdict.problems
            found.notes += [verdict.note()] if verdict.note() else []
            if not cache:
                known = {str(p) for p in verdict.problems}
                found.notes += [f"{p} (a test case: training goes on without it, predict would refuse it)"
                                for p in check_dataset(root, split="test").problems if str(p) not in known]
        if c.dimension == "3d" and not found.problems:  # resampled, every case fits the volume budget
            try:
                target = target_spacing(read_dataset(c.train).cases("training"), c.spacing, c.train)
                for root in (r for r in (c.train, c.valid) if r is not None):
                    _, cases, mods = training_cases(root, None, parse_modalities(c.modalities))
                    plan_cases(cases, target, mods, c.volume_budget_mb << 20)
            except DataError as exc:
                found.problems.append(exc)
        return found

    def files(self) -> list[Path]:
        return [Path(p) for p in (self.config.train, self.config.valid, self.config.test) if p is not None]

    def volumes(self) -> VolumeTransform:
        c = self.config
        try:
            index = read_dataset(c.train) if not is_cache(c.train) else None
        except DataError:
            index = None
        names = parse_modalities(c.modalities)
        if names is None:
            modalities = None
        elif all(m.lstrip("-").isdigit() for m in names):
            modalities = [int(m) for m in names]
        elif index is None or not index.modalities:
            raise DataError(c.train, f"modalities {c.modalities!r} are names but the training data declares none",
                            "name the modalities by channel index in the job")
        else:
            modalities = [index.modality_index(m) for m in names]
        declared = len(index.labels) if index is not None else 0
        if c.dimension == "3d":  # the 3D transform (volume3d.py)
            from .volume3d import PatchTransform

            return PatchTransform(c.input_size(), target_spacing(read_dataset(c.train).cases("training"), c.spacing, c.train),
                                  c.valid_overlap, modalities, c.normalise, Path(c.test or c.train),
                                  max(2, declared) if declared else None,
                                  channel_names_of(index.modalities, modalities) if index is not None else None)
        return SliceTransform(c.size, modalities, c.normalise, Path(c.test or c.train), max(2, declared) if declared else None,
                              channel_names=channel_names_of(index.modalities, modalities) if index is not None else None)

    def volumes_from_card(self, card: dict, num_classes: int | None) -> VolumeTransform:
        if card.get("dimension") == "3d":
            from .volume3d import PatchTransform

            return PatchTransform.from_card(card, num_classes)
        return SliceTransform.from_card(card, num_classes)


@dataclass(frozen=True)
class SliceTransform(DatasetInputs, SlicePrediction, VolumeTransform):
    """The decathlon format's volume transform: the training pre-processing of every slice along the third
    axis."""

    size: int
    modalities: list[int] | None
    normalise: bool
    default_input: Path | None  # what predict reads when given no --input: the job's <test>, else its <train>
    num_classes: int | None  # the labels the training data declares, if it declares them
    axis: int = 2  # the slices are taken across this axis of the volume
    channel_names: tuple[str, ...] | None = None  # the modalities the model reads, by dataset.json's names

    def card(self) -> dict:
        """What a checkpoint records of this transform (``from_card`` rebuilds it)."""
        return {"slice_axis": self.axis, "size": self.size, "modalities": self.modalities, "normalise": self.normalise,
                "channel_names": self.channel_names}

    @classmethod
    def from_card(cls, card: dict, num_classes: int | None) -> SliceTransform:
        names = card.get("channel_names")
        return cls(int(card["size"]), card["modalities"], bool(card["normalise"]), None, num_classes,
                   int(card.get("slice_axis", 2)), tuple(names) if names else None)

    def to_slices(self, image: np.ndarray, where: Path) -> np.ndarray:
        """A channels-last volume ``(X, Y, Z, C)`` as stored (any dtype and memory order) as model input
        ``[Z, C, size, size]`` (float32): z-scored with each channel's statistics over the whole volume, then
        resized, a few slices at a time, as the slice cache is built (no float copy of the whole volume)."""
        image = image[..., None] if image.ndim == 3 else image
        try:
            select_modalities(image[:1, :1, :1], self.modalities)  # modalities the volume lacks are refused
        except ValueError as exc:
            raise DataError(where, str(exc), "predict on images with the modalities the model was trained on") from None
        x, y, depth, stored = image.shape
        channels = list(range(stored)) if self.modalities is None else [int(m) % stored for m in self.modalities]
        stats = (np.array([zscore_stats(image[..., c]) for c in channels]).T.reshape(2, 1, -1, 1, 1)
                 if self.normalise else None)
        out = np.empty((depth, len(channels), self.size, self.size), np.float32)
        step = max(1, slicing.CHUNK_BYTES // (x * y * len(channels) * 4))
        for lo in range(0, depth, step):
            part = np.moveaxis(image[:, :, lo:lo + step][..., channels], (2, 3), (0, 1))  # [n, C, X, Y]
            part = zscored(part, *stats) if stats is not None else part.astype(np.float32)
            out[lo:lo + step] = resize(part, (self.size, self.size))
        return out
