"""3D training data: a disk-backed cache of resampled volumes, random patches from it, whole volumes.

:func:`build_volume_cache` writes every labelled case pre-processed by
:func:`~autocnnp.data.resample.preprocess_volume` (z-scored, resampled to one target spacing, layout
``[C, D, H, W]``) into one flat ``images.npy`` (float16 when z-scored, else float32) and its label map
into ``labels.npy`` (uint8), case after case; ``meta.json`` says where each case lies, its shape, and up
to :data:`LOCATIONS` voxels of each class present (for foreground patches). It shares the slice cache's
machinery (:func:`~autocnnp.data.preprocess.built_once`): content-keyed, built once under a lock by
whichever rank comes first, resumable case by case.

:class:`PatchDataset` serves random patches ``[C, pd, ph, pw]`` of the memory-mapped cache (only the
patch is read: no rank holds the dataset in memory); item ``i`` of epoch ``e`` is fed as index
``e * len + i`` (:class:`~autocnnp.data.batches.EpochIndices`) and drawn from ``(seed, e, i)`` alone, so
any rank or worker reads the same patch for it. :class:`VolumeDataset` serves whole volumes (validation).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DataError
from ..core.files import read_json, write_json
from .batches import BatchDataset
from .index import Case
from .preprocess import (
    DONE_DIR,
    IMAGES_FILE,
    LABELS_FILE,
    Arrays,
    _arrays,
    _case_runner,
    _Progress,
    _write_at,
    built_once,
    cache_key,
    case_stats,
    check_byte_labels,
    dataset_fields,
    done_records,
    pool_size,
    training_cases,
)
from .resample import preprocess_label, preprocess_volume
from .spacing import case_geometry, model_shape, resampled_shape
from .volumes import header_spacing, read_case

VOLUME_FORMAT = "volumes-1"  # meta.json "format": the slice cache's readers refuse it
LOCATIONS = 500  # voxels of each present class kept per case for foreground patches


@dataclass(frozen=True)
class Plan:
    """A case's resampled grid ``(D, H, W)`` and channel count, planned from its header."""

    case: Case
    shape: tuple[int, int, int]
    channels: int


def plan_cases(cases: list[Case], target_spacing, mods, budget_bytes: int) -> list[Plan]:
    """Each case's resampled grid from its header; a DataError naming a case that resampling to
    ``target_spacing`` would blow beyond ``budget_bytes`` (float32, all channels), or whose channels differ."""
    plans = []
    for case in cases:
        shape, spacing = case_geometry(case)
        image, stored = Path(case.image), shape[-1]
        if mods is not None and any(not 0 <= m < stored for m in mods):
            raise DataError(image, f"image has {stored} channel(s); modalities {mods} were asked for",
                            "pick modalities that every image has")
        channels = len(mods) if mods is not None else stored
        grid = model_shape(resampled_shape(shape, spacing, target_spacing))
        size = 4 * channels * int(np.prod(grid))
        if size > budget_bytes:
            raise DataError(image, f"case {case.name} ({'x'.join(map(str, shape[:3]))} voxels of {spacing} mm) resampled "
                            f"to {tuple(target_spacing)} mm becomes {'x'.join(map(str, grid))} (D x H x W) x "
                            f"{channels} channel(s), {size / 2**20:.0f} MiB, beyond the budget of "
                            f"{budget_bytes / 2**20:.0f} MiB", "give a coarser spacing, or raise volume_budget_mb")
        if plans and channels != plans[0].channels:
            raise DataError(image, f"image has {channels} channel(s), earlier cases have {plans[0].channels}",
                            "give every case the same modalities, or select modalities")
        plans.append(Plan(case, grid, channels))
    return plans


def build_volume_cache(root, cache_dir, *, target_spacing, modalities=None, normalise: bool,
                       case_indices=None, budget_bytes: int = 1 << 30, workers: int | None = None,
                       progress: bool = False) -> Path:
    """Build (or reuse, or finish) the volume cache of the labelled cases of dataset ``root`` at positions
    ``case_indices`` (None: all), resampled to ``target_spacing`` ``(x, y, z)`` mm. Safe to call from every
    rank at once (see :func:`~autocnnp.data.preprocess.built_once`). Returns ``cache_dir``."""
    ds, cases, mods = training_cases(root, case_indices, modalities)
    params = {"format": VOLUME_FORMAT, "spacing": [float(s) for s in target_spacing], "modalities": mods,
              "normalise": bool(normalise), "cases": case_stats(cases)}
    key = cache_key(params)

    def build(work: Path) -> dict:
        plans = plan_cases(cases, target_spacing, mods, budget_bytes)
        voxels = [int(np.prod(p.shape)) for p in plans]
        channels = plans[0].channels
        lab_first = np.concatenate([[0], np.cumsum(voxels)]).astype(np.int64).tolist()
        dtype = np.dtype(np.float16 if normalise else np.float32)
        offsets = _arrays(work, {IMAGES_FILE: ((lab_first[-1] * channels,), dtype),
                                 LABELS_FILE: ((lab_first[-1],), np.dtype(np.uint8))})
        layout = _Layout(work / IMAGES_FILE, work / LABELS_FILE, offsets[0], offsets[1], dtype.name, mods,
                         normalise, tuple(target_spacing), work / DONE_DIR)
        records = done_records(layout.done, lambda i, r: 0 <= i < len(plans))
        todo = [(i, plans[i], lab_first[i]) for i in range(len(plans)) if i not in records]
        meter = _Progress(len(plans), len(records)) if progress else None
        with _case_runner(pool_size(len(cases), params["cases"], workers)) as run:
            for position, record in run(functools.partial(_build_case, layout=layout), todo):
                records[position] = record
                if meter is not None:
                    meter.case_done(1)
        return {"format": VOLUME_FORMAT, "key": key, "count": len(plans), "channels": channels,
                "spacing": [float(s) for s in target_spacing], "dtype": {"images": dtype.name, "labels": "uint8"},
                **dataset_fields(ds, mods, channels, records),
                "cases": [{"name": p.case.name, "shape": list(p.shape), "voxels": first,
                           "locations": records[i]["locations"]} for i, (p, first) in enumerate(zip(plans, lab_first))]}

    return built_once(Path(cache_dir), key, build)


@dataclass(frozen=True)
class _Layout(Arrays):
    """Where a case's volume is written, and how it is pre-processed."""

    normalise: bool
    spacing: tuple[float, float, float]
    done: Path


def _build_case(position: int, plan: Plan, first: int, layout: _Layout) -> tuple[int, dict]:
    """Pre-process one case into the arrays at voxel ``first``; record its class counts and locations."""
    volume, label, img = read_case(plan.case)
    check_byte_labels(plan.case, label)
    spacing = header_spacing(Path(plan.case.image), img)
    image = preprocess_volume(volume, spacing, layout.spacing, layout.channels, layout.normalise)
    labels = preprocess_label(label, spacing, layout.spacing)
    dtype = np.dtype(layout.image_dtype)
    with open(layout.images, "r+b") as f:
        _write_at(f, image.astype(dtype), layout.images_offset + first * image.shape[0] * dtype.itemsize)
    with open(layout.labels, "r+b") as f:
        _write_at(f, labels, layout.labels_offset + first)
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=1)
    rng = np.random.default_rng([position, 0x10CA7])
    locations = {}
    for value in np.flatnonzero(counts[1:]) + 1:
        where = np.flatnonzero(flat == value)
        keep = np.sort(rng.choice(where, LOCATIONS, replace=False)) if where.size > LOCATIONS else where
        locations[str(int(value))] = keep.tolist()
    record = {"label_counts": counts.tolist(), "locations": locations}
    write_json(layout.done / f"{position}.json", record)
    return position, record


class _VolumeCache(BatchDataset):
    """The cases of a volume cache, memory-mapped lazily once per process (``cases``: names to keep)."""

    def __init__(self, cache_dir, cases=None):
        self.cache_dir = Path(cache_dir)
        meta = read_json(self.cache_dir / "meta.json")
        if meta is None or meta.get("format") != VOLUME_FORMAT:
            raise DataError(self.cache_dir / "meta.json", "no volume cache here (meta.json missing or of another "
                            "format)", "let the job build it: give <train> a dataset, not a cache")
        self.meta = meta
        wanted = None if cases is None else {str(c) for c in cases}
        self.cases = [c for c in meta["cases"] if wanted is None or c["name"] in wanted]
        self._arrays = None

    @property
    def num_channels(self) -> int:
        return int(self.meta["channels"])

    def __getstate__(self):  # reopened in each worker process
        return {**self.__dict__, "_arrays": None}

    def _open(self):
        if self._arrays is None:
            self._arrays = (np.load(self.cache_dir / IMAGES_FILE, mmap_mode="r"),
                            np.load(self.cache_dir / LABELS_FILE, mmap_mode="r"))
        return self._arrays

    def volume(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Case ``i``'s image ``[C, D, H, W]`` and label ``[D, H, W]`` as memory-mapped views (nothing read)."""
        case, (images, labels) = self.cases[i], self._open()
        shape, first, channels = tuple(case["shape"]), int(case["voxels"]), self.num_channels
        n = int(np.prod(shape))
        return (images[first * channels:(first + n) * channels].reshape((channels,) + shape),
                labels[first:first + n].reshape(shape))


class VolumeDataset(_VolumeCache):
    """Whole resampled volumes: item ``i`` is case ``i`` (validation reads one at a time: shapes differ)."""

    def __len__(self) -> int:
        return len(self.cases)

    def read_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.volume(int(i)) for i in indices]
        if len({p[1].shape for p in pairs}) > 1:
            raise ValueError("volumes of different shapes cannot share a minibatch: read them one at a time")
        return (torch.from_numpy(np.stack([np.asarray(p[0]) for p in pairs])),
                torch.from_numpy(np.stack([np.asarray(p[1]) for p in pairs])))


class PatchDataset(_VolumeCache):
    """``length`` random patches ``patch = (pd, ph, pw)`` per epoch of the cached cases: item ``i`` comes from
    case ``i mod cases``, centred with probability ``foreground_share`` on a voxel of a class present in the
    case (chosen uniformly), else anywhere; parts beyond the volume are zeros (background). The draw depends
    on ``(seed, epoch, i)`` only; the items are fed as ``epoch * length + i``."""

    epoch_indexed = True  # read with batches.EpochIndices

    def __init__(self, cache_dir, *, patch, length: int, foreground_share: float, seed: int, cases=None):
        super().__init__(cache_dir, cases)
        if not self.cases:
            raise DataError(self.cache_dir, "the volume cache holds none of the training cases", "rebuild it")
        self.patch = tuple(int(p) for p in patch)
        self.length = max(1, int(length))
        self.foreground_share = float(foreground_share)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.length

    def corner(self, index: int) -> tuple[int, tuple[int, int, int]]:
        """``(case, first voxel (d, h, w))`` of item ``index`` (``epoch * len + i``); the first voxel may lie
        outside the volume (padding)."""
        epoch, i = divmod(int(index), self.length)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, i, 0x9A7C4])
        which = i % len(self.cases)
        case = self.cases[which]
        shape = tuple(case["shape"])
        present = sorted(case["locations"])
        if present and rng.random() < self.foreground_share:
            voxels = case["locations"][present[int(rng.integers(len(present)))]]
            centre = np.unravel_index(int(voxels[int(rng.integers(len(voxels)))]), shape)
            first = [int(c) - p // 2 for c, p in zip(centre, self.patch)]
        else:
            first = [int(rng.integers(0, n - p + 1)) if n >= p else 0 for n, p in zip(shape, self.patch)]
        # inside the volume where it fits, centred on it where it does not
        first = [min(max(f, 0), n - p) if n >= p else (n - p) // 2 for f, n, p in zip(first, shape, self.patch)]
        return which, tuple(first)  # type: ignore[return-value]

    def read_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = np.zeros((len(indices), self.num_channels) + self.patch, np.dtype(self.meta["dtype"]["images"]))
        labels = np.zeros((len(indices),) + self.patch, np.uint8)
        for k, index in enumerate(indices):
            which, first = self.corner(int(index))
            image, label = self.volume(which)
            src = tuple(slice(max(f, 0), min(f + p, n)) for f, p, n in zip(first, self.patch, label.shape))
            dst = tuple(slice(s.start - f, s.stop - f) for s, f in zip(src, first))
            images[(k, slice(None)) + dst] = image[(slice(None),) + src]
            labels[(k,) + dst] = label[src]
        return torch.from_numpy(images), torch.from_numpy(labels)
