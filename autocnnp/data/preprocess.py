"""ImgMed: turning 3D/4D NIfTI cases into a fast on-disk cache of 2D training slices.

The thesis' pre-processing (section 2.3 and ImgMed, section 3.3.2.1): keep some modalities
(BraTS was reduced to T1w), extract N 2D slices per scan (70 in the thesis), resize them
(512 x 512 for the left atrium) and z-score the intensities. :func:`build_cache` does this once
and writes ``images.npy`` (``[N, C, H, W]``), ``labels.npy`` (uint8 ``[N, H, W]``) and
``meta.json`` into a cache folder; :class:`CacheDataset` serves the slices to PyTorch from
memory-mapped files, touching only the slices it is asked for.

Storage dtype (``meta.json`` ``"dtype"``): z-scored images are stored as float16, raw intensities
(``normalise`` off, e.g. CT in Hounsfield units, where float16 steps grow to 2 HU above 2048) as
float32; labels as uint8. float16 is lossless enough for z-scored images: the values are in units of
the channel's standard deviation, and float16 keeps 11 significant bits, so every stored value lies
within a relative 2^-11 (0.05 %) of the float32 one (2^-25 absolute near zero), far below the noise
of MRI or CT images (a few % of the signal). It cannot overflow either: a z-score over n voxels is
at most sqrt(n - 1) in magnitude, below float16's 65504 for any volume of fewer than 4e9 voxels. The
cache is half the size and reads twice as fast. Caches of format 1 (float32 images) stay readable; a
build finding one rebuilds it.

Building runs over the cases in parallel (``workers`` processes, each reading its cases and writing
their slices straight into the preallocated arrays at offsets planned beforehand), and works on one
case at a time per process: a volume is decompressed in one call, its z-score statistics summed in
float64 without copies, and only the selected slices are normalised, resized (a slice at a time, in
cache) and written. Cache building is idempotent, resumable and safe to run from many processes at
once (all ranks of a job may call it): the build holds an exclusive ``fcntl.flock`` on
``cache_dir/.lock`` and writes into ``cache_dir/.build-<content key>``, recording each finished case
in ``done/``; a build interrupted (Ctrl-C, kill, a bad file) and started again with the same inputs
skips the finished cases. The finished files are renamed into place, ``meta.json`` last, so a
matching ``meta.json`` means complete data; a second call whose content key (a hash of the
parameters and of the source files' paths, sizes and modification times) matches ``meta.json``
returns at once without writing anything.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DataError
from ..core.files import atomic_write, exclusive_lock, read_json, reserve, write_json, writing
from ..core.processes import case_runner, usable_cores
from .batches import BatchDataset
from .checks import Verdict
from .index import Case, read_dataset
from .slices import MODES, check_fraction, resize, size_pair, slice_indices, zscore_stats, zscored
from .volumes import image_shape, open_label, open_nifti, read_case, read_label

CACHE_FORMAT = 2
READABLE_FORMATS = (1, 2)  # format 1 stored the images as float32 whether z-scored or not
IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
META_FILE = "meta.json"
LOCK_FILE = ".lock"
BUILD_PREFIX = ".build-"  # + the content key: the build in progress
_STALE_PREFIXES = (BUILD_PREFIX, ".tmp-")  # .tmp-: left by a crashed build of format 1
PLANS_FILE = "plans.json"
DONE_DIR = "done"
POOL_MIN_BYTES = 64 << 20  # smaller sources are built in this process: starting workers costs about a second
STEP_BYTES = 4 << 20  # float32 output resized per step: one 4-channel 512 x 512 slice, small enough to stay in cache


# --------------------------------------------------------------------------------------------
# The cache

def _stat(path: Path) -> list:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(path, "file does not exist", "fix the path in the dataset index or restore the file") from None
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _read_meta(cache_dir: Path) -> dict | None:
    return read_json(cache_dir / META_FILE)


def _is_current(cache_dir: Path, key: str) -> bool:
    meta = _read_meta(cache_dir)
    return (
        meta is not None
        and meta.get("key") == key
        and (cache_dir / IMAGES_FILE).is_file()
        and (cache_dir / LABELS_FILE).is_file()
    )


def cache_key(params: dict) -> str:
    """The content key of a cache: sha256 of the canonical JSON of ``params``."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def build_cache(
    root,
    cache_dir,
    *,
    n_slices: int | None,
    size,
    modalities=None,
    mode: str = "even",
    normalise: bool,
    case_indices=None,
    axis: int = 2,
    foreground_fraction: float = 0.5,
    workers: int | None = None,
    progress: bool = False,
) -> Path:
    """Build (or reuse, or finish) the 2D slice cache of the labelled cases of dataset ``root``.

    ``root`` is anything :func:`~autocnnp.data.index.read_dataset` accepts. ``n_slices`` slices
    per case are taken along ``axis`` (``mode`` ``"even"``, ``"labelled"`` or ``"mixed"`` with
    ``foreground_fraction``, see :func:`slice_indices`; ``None``/``0`` takes all), restricted to the
    channels ``modalities`` (indices or modality names from dataset.json; ``None`` keeps all),
    z-scored per case and channel when ``normalise``, and resized to ``size`` (int or ``(H, W)``). ``case_indices``
    picks training cases by position in the index (``None``: all). ``workers`` processes share the
    cases (default: the cores this process may use, capped by the number of cases; sources under
    64 MiB are built in this process). ``progress`` shows cases done, slices/s and the time left on
    stderr. Returns ``cache_dir``.

    A second call with the same inputs is a no-op; one after an interrupted build finishes it.
    Concurrent calls (several ranks or processes) serialise on an exclusive lock of
    ``cache_dir/.lock``; the losers wait and reuse the cache.
    """
    if mode not in MODES:
        raise ValueError(f"slice mode must be one of {', '.join(MODES)}, got {mode!r}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    if workers is not None and int(workers) < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    fraction = check_fraction(foreground_fraction)
    h, w = size_pair(size)
    ds, cases, mods = training_cases(root, case_indices, modalities)

    params = {
        "format": CACHE_FORMAT,
        "n_slices": None if not n_slices else int(n_slices),
        "size": [h, w],
        "modalities": mods,
        "mode": mode,
        "normalise": bool(normalise),
        "axis": axis,
        "foreground_fraction": fraction,
        "cases": case_stats(cases),
    }
    key = cache_key(params)

    def build(work: Path) -> dict:
        with _case_runner(pool_size(len(cases), params["cases"], workers)) as run:
            return _write_cache(work, cases, params, key, ds, mods, run, progress)

    return built_once(Path(cache_dir), key, build)


def training_cases(root, case_indices=None, modalities=None) -> tuple:
    """``(index, cases, channels)``: the labelled cases of dataset ``root`` at positions ``case_indices`` (None:
    all) and the channel indices of ``modalities`` (names or indices; None: all), or a DataError."""
    ds = read_dataset(root)
    cases = ds.cases("training")
    if case_indices is not None:
        picked = [int(i) for i in case_indices]
        bad = [i for i in picked if not 0 <= i < len(cases)]
        if bad:
            raise DataError(ds.index_file, f"case indices {bad} are out of range (the index lists {len(cases)} "
                            "training cases)", "pick case indices between 0 and the number of cases - 1")
        cases = [cases[i] for i in picked]
    if not cases:
        raise DataError(ds.index_file, "no labelled training cases to build a cache from",
                        "list image,label pairs in the dataset index")
    mods = None if modalities is None else [ds.modality_index(m) for m in modalities]
    if mods is not None and not mods:
        raise DataError(ds.index_file, "an empty list of modalities was asked for", "name at least one modality")
    return ds, cases, mods


def case_stats(cases) -> list[list]:
    """What a cache's content key holds of each case: its name and its files' paths, sizes and times."""
    return [[c.name] + _stat(Path(c.image)) + _stat(Path(c.label)) for c in cases]


def pool_size(n_cases: int, stats: list[list], workers: int | None) -> int:
    """Worker processes for a build: ``workers``, else the usable cores when the sources (``case_stats``) are
    large enough to pay for starting them, capped by the number of cases."""
    source_bytes = sum(entry[2] for entry in stats)
    return min(n_cases, int(workers) if workers is not None else
               (usable_cores() if source_bytes >= POOL_MIN_BYTES else 1))


def built_once(out: Path, key: str, build) -> Path:
    """Make ``out`` hold the cache of content ``key`` exactly once across processes: return at once when its
    ``meta.json`` matches, else, holding ``out/.lock``, call ``build(work)`` (which writes the arrays into the
    build folder ``work``, kept across interrupted attempts, and returns the meta) and move the result into
    place, ``meta.json`` last."""
    if _is_current(out, key):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out / LOCK_FILE):
        if _is_current(out, key):  # someone else built it while we waited
            return out
        work = out / f"{BUILD_PREFIX}{key[:16]}"
        for stale in out.iterdir():  # left by a build of other inputs; we hold the lock
            if stale.name.startswith(_STALE_PREFIXES) and stale != work:
                shutil.rmtree(stale, ignore_errors=True)
        work.mkdir(exist_ok=True)
        _commit(work, out, build(work))
        shutil.rmtree(work, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# Building: the plans, one case, the workers

def _plan_case(position: int, case: Case, *, mods, mode: str, n_slices, axis: int, fraction: float):
    """``(position, slice indices, channels)`` of one case from the image header (and the label unless 'even')."""
    image_path = Path(case.image)
    shape = image_shape(image_path, open_nifti(image_path).shape)
    if mods is not None and any(not 0 <= m < shape[-1] for m in mods):
        raise DataError(image_path, f"image has {shape[-1]} channel(s); modalities {mods} were asked for",
                        "pick modalities that every image has")
    lab = open_label(case, shape)
    label = None if mode == "even" else read_label(Path(case.label), lab)
    indices = slice_indices(shape[axis], n_slices, mode, label=label, axis=axis, foreground_fraction=fraction)
    return position, indices.tolist(), len(mods) if mods is not None else shape[-1]


@dataclass(frozen=True)
class Arrays:
    """Where a cache build writes a case: the image and label arrays (and their data offsets), the images'
    dtype, the channels kept (None: all)."""

    images: Path
    labels: Path
    images_offset: int
    labels_offset: int
    image_dtype: str
    channels: list[int] | None


@dataclass(frozen=True)
class _Layout(Arrays):
    """Where and how a case's slices are written: the arrays, the slices' form."""

    axis: int
    normalise: bool
    size: tuple[int, int]
    done: Path


def _build_case(position: int, case: Case, indices: list[int], first: int, layout: _Layout) -> tuple[int, dict]:
    """Write the slices ``indices`` of ``case`` as cache rows ``first, first + 1, ...`` and record the case done:
    ``(position, record)``; only the selected slices are normalised, resized and converted."""
    volume, label, _ = read_case(case)
    check_byte_labels(case, label)
    h, w = layout.size
    channels = layout.channels if layout.channels is not None else list(range(volume.shape[-1]))
    if layout.normalise:
        stats = np.array([zscore_stats(volume[..., m]) for m in channels]).T.reshape(2, 1, -1, 1, 1)
    dtype = np.dtype(layout.image_dtype)
    row_bytes = len(channels) * h * w * dtype.itemsize
    step = max(1, STEP_BYTES // (len(channels) * h * w * 4))
    where = [slice(None)] * 3
    with open(layout.images, "r+b") as images, open(layout.labels, "r+b") as labels:
        for lo in range(0, len(indices), step):
            part = indices[lo:lo + step]
            raw = np.empty((len(part), len(channels)) + _plane(volume.shape, layout.axis), np.float32)
            for j, z in enumerate(part):
                where[layout.axis] = z
                for c, m in enumerate(channels):
                    raw[j, c] = volume[(*where, m)]
            if layout.normalise:
                raw = zscored(raw, *stats)
            _write_at(images, resize(raw, (h, w), dtype=dtype), layout.images_offset + (first + lo) * row_bytes)
        slices = resize(np.moveaxis(np.take(label, indices, axis=layout.axis), layout.axis, 0).astype(np.uint8),
                        (h, w), label=True)
        _write_at(labels, slices, layout.labels_offset + first * h * w)
    counts = np.bincount(slices.ravel(), minlength=1)
    record = {"slices": len(indices), "label_counts": counts.tolist()}
    write_json(layout.done / f"{position}.json", record)
    return position, record


def check_byte_labels(case: Case, label: np.ndarray) -> None:
    """A DataError unless the label map of ``case`` holds values 0..255 only (a cache stores them as uint8)."""
    if label.size and (label.min() < 0 or label.max() > 255):
        raise DataError(case.label, f"label values range {int(label.min())}..{int(label.max())} does not fit 0..255",
                        "store class indices 0..255")


def _plane(shape: tuple[int, ...], axis: int) -> tuple[int, int]:
    """The spatial shape of a slice across ``axis`` of a volume of ``shape`` ``(X, Y, Z, ...)``."""
    return tuple(int(s) for a, s in enumerate(shape[:3]) if a != axis)


def _write_at(file, array: np.ndarray, offset: int) -> None:
    """Write ``array``'s bytes at ``offset`` of the open ``file`` (positioned writes: workers share the file)."""
    view = memoryview(np.ascontiguousarray(array)).cast("B")
    while view:
        written = os.pwrite(file.fileno(), view, offset)
        view, offset = view[written:], offset + written


def _one_thread() -> None:
    torch.set_num_threads(1)


@contextlib.contextmanager
def _case_runner(workers: int):
    """``run(fn, jobs)`` of :func:`~autocnnp.core.processes.case_runner`, torch on one thread in each worker: the
    cases are the parallel work (torch's thread pool on small per-slice calls is slower, several times so on a
    busy machine)."""
    if workers > 1:
        with case_runner(workers, _one_thread) as run:
            yield run
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with case_runner(1) as run:
            yield run
    finally:
        torch.set_num_threads(threads)


def _plans(work: Path, cases, params, mods, run) -> tuple[list[list[int]], int]:
    """The slice indices of every case and the channel count, planned once per build (kept for a resume)."""
    saved = read_json(work / PLANS_FILE)
    if saved is not None:
        return saved["plans"], saved["channels"]
    plan = functools.partial(_plan_case, mods=mods, mode=params["mode"], n_slices=params["n_slices"],
                             axis=params["axis"], fraction=params["foreground_fraction"])
    plans: list = [None] * len(cases)
    channels: list = [None] * len(cases)
    for position, indices, count in run(plan, list(enumerate(cases))):
        plans[position], channels[position] = indices, count
    for case, count in zip(cases, channels):
        if count != channels[0]:
            raise DataError(case.image, f"image has {count} channel(s), earlier cases have {channels[0]}",
                            "give every case the same modalities, or select modalities")
    write_json(work / PLANS_FILE, {"plans": plans, "channels": channels[0]})
    return plans, channels[0]


def _arrays(work: Path, shapes: dict) -> list[int]:
    """The data offsets of the arrays ``{file: (shape, dtype)}`` in ``work``: those of a build in progress
    when they match, else new (sparse) files, and the record of finished cases cleared."""
    try:
        arrays = [np.load(work / name, mmap_mode="r") for name in shapes]
        if all(a.shape == shape and a.dtype == dtype for a, (shape, dtype) in zip(arrays, shapes.values())):
            return [a.offset for a in arrays]
    except (OSError, ValueError):
        pass
    shutil.rmtree(work / DONE_DIR, ignore_errors=True)
    offsets = []
    for name, (shape, dtype) in shapes.items():
        with writing(work / name):
            offsets.append(np.lib.format.open_memmap(work / name, mode="w+", dtype=dtype, shape=shape).offset)
            reserve(work / name)  # a full disk now, not a SIGBUS when a case is written into the map
    return offsets


def _write_cache(work: Path, cases, params, key, ds, mods, run, progress: bool) -> dict:
    """Plan the cases, allocate the arrays (or find those of an interrupted build), build the cases not
    recorded done in the build folder ``work``; returns what ``meta.json`` will hold."""
    h, w = params["size"]
    plans, channels = _plans(work, cases, params, mods, run)
    firsts = np.concatenate([[0], np.cumsum([len(p) for p in plans])]).tolist()
    total = firsts[-1]
    image_dtype = np.dtype(np.float16 if params["normalise"] else np.float32)
    images_offset, labels_offset = _arrays(work, {IMAGES_FILE: ((total, channels, h, w), image_dtype),
                                                  LABELS_FILE: ((total, h, w), np.dtype(np.uint8))})
    layout = _Layout(work / IMAGES_FILE, work / LABELS_FILE, images_offset, labels_offset, image_dtype.name, mods,
                     params["axis"], params["normalise"], (h, w), work / DONE_DIR)
    records = done_records(layout.done, lambda i, r: 0 <= i < len(cases) and r["slices"] == len(plans[i]))
    todo = [(i, cases[i], plans[i], firsts[i]) for i in range(len(cases)) if i not in records]
    meter = _Progress(len(cases), len(records)) if progress else None
    for position, record in run(functools.partial(_build_case, layout=layout), todo):
        records[position] = record
        if meter is not None:
            meter.case_done(record["slices"])
    meta = {
        "format": CACHE_FORMAT,
        "key": key,
        "count": total,
        "channels": int(channels),
        "size": [h, w],
        "dtype": {"images": image_dtype.name, "labels": "uint8"},
        **dataset_fields(ds, mods, int(channels), records),
        "params": {k: v for k, v in params.items() if k != "cases"},
        "cases": [{"name": c.name, "image": str(Path(c.image).resolve()), "label": str(Path(c.label).resolve()),
                   "slices": len(p)} for c, p in zip(cases, plans)],
        "slice_case": [i for i, p in enumerate(plans) for _ in p],
        "slice_index": [int(z) for p in plans for z in p],
    }
    return meta


def done_records(done: Path, fits) -> dict[int, dict]:
    """The records ``done/<position>.json`` of the cases an interrupted build finished, those that ``fits(position,
    record)`` (the others are built again); makes ``done``."""
    done.mkdir(exist_ok=True)
    records = {int(p.stem): read_json(p) for p in done.glob("*.json")}
    return {i: r for i, r in records.items() if r is not None and fits(i, r)}


def dataset_fields(ds, mods, channels: int, records: dict[int, dict]) -> dict:
    """What a cache's meta.json says of its source: the index, the dataset's name, the channels kept (indices and
    names), the declared labels and the voxel (or pixel) count of each label over the cases' ``records``."""
    counts = np.zeros(256, dtype=np.int64)
    for record in records.values():
        counts[: len(record["label_counts"])] += record["label_counts"]
    top = int(np.flatnonzero(counts).max()) if counts.any() else 0
    names = mods if mods is not None else list(range(channels))
    return {"source": str(ds.index_file.resolve()), "dataset": ds.name, "modalities": names,
            "modality_names": [ds.modalities.get(m, str(m)) for m in names],
            "labels": {str(k): v for k, v in ds.labels.items()}, "label_counts": counts[: top + 1].tolist()}


class _Progress:
    """Cases done of the total, slices/s and the time left, on stderr: one line redrawn in place on a
    terminal, else a plain line at each quarter of the cases and at most one a minute in between; nothing
    for builds done within ``QUIET_S`` seconds."""

    QUIET_S = 2.0

    def __init__(self, total: int, done: int):
        self.stream = sys.stderr
        self.tty = self.stream.isatty()
        self.total, self.done, self.resumed = total, done, done
        self.slices = 0
        self.start = self.shown = time.monotonic()
        self.quarter = 4 * done // total
        if done:
            print(f"preprocess: resuming, {done} of {total} case(s) done before", file=self.stream, flush=True)

    def case_done(self, slices: int) -> None:
        self.done += 1
        self.slices += slices
        now = time.monotonic()
        quarter, last = 4 * self.done // self.total, self.done == self.total
        if now - self.start < self.QUIET_S:
            return
        if self.tty and (last or now - self.shown >= 0.2) or quarter > self.quarter or now - self.shown >= 60:
            self.quarter, self.shown = quarter, now
            elapsed = now - self.start
            left = elapsed / (self.done - self.resumed) * (self.total - self.done)
            text = (f"preprocess: {self.done}/{self.total} cases, {self.slices / max(elapsed, 1e-9):.1f} slices/s, "
                    + (f"done in {elapsed:.1f} s" if last else f"ETA {_duration(left)}"))
            self.stream.write(f"\r{text}\033[K" + ("\n" if last else "") if self.tty else text + "\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _commit(work: Path, out: Path, meta: dict) -> None:
    """Move a finished build into place; ``meta.json`` is written last so a matching meta means complete data."""
    (out / META_FILE).unlink(missing_ok=True)
    os.replace(work / IMAGES_FILE, out / IMAGES_FILE)
    os.replace(work / LABELS_FILE, out / LABELS_FILE)
    atomic_write(out / META_FILE, json.dumps(meta))


def read_cache_meta(cache_dir) -> dict:
    """The ``meta.json`` of a cache (of any readable format), or a DataError saying to build it."""
    cache_dir = Path(cache_dir)
    meta = _read_meta(cache_dir)
    if meta is None or meta.get("format") not in READABLE_FORMATS:
        raise DataError(cache_dir / META_FILE, "no usable training cache here (meta.json missing, unreadable or "
                        "of another format)", "build it with autocnnp.data.preprocess.build_cache")
    return meta


def is_cache(root) -> bool:
    """Whether ``root`` is a slice cache folder written by :func:`build_cache` / ``autocnnp preprocess``."""
    return (Path(root) / META_FILE).is_file() and (Path(root) / IMAGES_FILE).is_file()


def cache_key_of(root) -> str:
    """What a cache check is stamped with: the cache's content key and its files' sizes and times."""
    root = Path(root)
    meta = _read_meta(root) or {}
    stats = [[name, (root / name).stat().st_size, (root / name).stat().st_mtime_ns]
             for name in (IMAGES_FILE, LABELS_FILE, META_FILE) if (root / name).is_file()]
    return hashlib.sha256(json.dumps([meta.get("key"), stats]).encode()).hexdigest()


def check_cache(root, chunk: int = 256) -> Verdict:
    """Check a slice cache as ``validate --data`` checks a dataset: meta.json, the arrays' shapes, finite
    images, label values within the declared labels; cases whose slices hold background only are noted.
    The arrays are read ``chunk`` slices at a time (bounded memory)."""
    root = Path(root)
    verdict = Verdict()
    try:
        meta = read_cache_meta(root)
        images = np.load(root / IMAGES_FILE, mmap_mode="r")
        labels = np.load(root / LABELS_FILE, mmap_mode="r")
    except (DataError, OSError, ValueError) as exc:
        verdict.problems.append(exc if isinstance(exc, DataError) else DataError(root, f"cache cannot be read ({exc})",
                                                                                 "rebuild it with autocnnp preprocess"))
        return verdict
    count, (h, w) = int(meta["count"]), meta["size"]
    if images.shape != (count, int(meta["channels"]), h, w) or labels.shape != (count, h, w):
        verdict.problems.append(DataError(root, f"cache arrays {images.shape} / {labels.shape} disagree with meta.json "
                                          f"({count} slices of {meta['channels']} x {h} x {w})",
                                          "rebuild it with autocnnp preprocess"))
        return verdict
    names = [c["name"] for c in meta["cases"]]
    slice_case = np.asarray(meta["slice_case"], dtype=np.int64)
    declared = {int(k) for k in meta.get("labels") or {}}
    bad_values, not_finite, foreground = set(), set(), np.zeros(len(names), dtype=bool)
    for lo in range(0, count, chunk):
        cases = slice_case[lo:lo + chunk]
        lab = np.asarray(labels[lo:lo + chunk])
        img = np.asarray(images[lo:lo + chunk])
        finite = np.isfinite(img).reshape(len(img), -1).all(axis=1)
        not_finite.update(names[c] for c in cases[~finite])
        values = set(np.unique(lab).tolist())
        if declared and values - declared:
            bad_values |= values - declared
        np.logical_or.at(foreground, cases, lab.reshape(len(lab), -1).any(axis=1))
    if not_finite:
        verdict.problems.append(DataError(root / IMAGES_FILE, f"slices of case(s) {', '.join(sorted(not_finite))} hold "
                                          "NaN or infinite values", "fix the source images and rebuild the cache"))
    if bad_values:
        verdict.problems.append(DataError(root / LABELS_FILE, f"label values {sorted(bad_values)} are outside the "
                                          f"declared labels {sorted(declared)}", "fix the label files and rebuild the cache"))
    verdict.empty_labels.extend(name for name, hit in zip(names, foreground) if not hit)
    return verdict


class CacheDataset(BatchDataset):
    """A PyTorch dataset over a cache written by :func:`build_cache`.

    ``dataset[i]`` is ``(image, label)``: a float32 tensor ``[C, H, W]`` and an int64 tensor ``[H, W]``;
    :meth:`read_batch` reads a whole minibatch in one fancy-indexed read, in the cache's dtypes. The
    arrays are memory-mapped (opened lazily, once per process), so only the slices asked for are read.
    ``indices`` restricts the dataset to some cache slices (e.g. a train/validation split by case, see
    :meth:`indices_of_cases`). ``in_memory`` reads the arrays into memory once instead (faster random
    access; memory grows with the cache). Augmentation is not the dataset's: the trainer applies the data
    format's batch augmentation on the training device.
    """

    def __init__(self, cache_dir, indices=None, *, in_memory: bool):
        self.cache_dir = Path(cache_dir)
        self.meta = read_cache_meta(self.cache_dir)
        for name in (IMAGES_FILE, LABELS_FILE):
            if not (self.cache_dir / name).is_file():
                raise DataError(self.cache_dir / name, "cache file is missing", "rebuild the cache with build_cache")
        self.count = int(self.meta["count"])
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices is not None and self.indices.size and (self.indices.min() < 0 or self.indices.max() >= self.count):
            raise IndexError(f"indices out of range for a cache of {self.count} slices")
        self.in_memory = bool(in_memory)
        self._images = None
        self._labels = None

    @property
    def num_channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.meta["size"])

    def indices_of_cases(self, names) -> np.ndarray:
        """Cache indices of the slices that come from the cases named ``names``."""
        wanted = {str(n) for n in names}
        case_ids = [i for i, c in enumerate(self.meta["cases"]) if c["name"] in wanted]
        return np.flatnonzero(np.isin(np.asarray(self.meta["slice_case"]), case_ids))

    def _open(self):
        if self._images is None:
            mode = None if self.in_memory else "r"
            images = np.load(self.cache_dir / IMAGES_FILE, mmap_mode=mode)
            labels = np.load(self.cache_dir / LABELS_FILE, mmap_mode=mode)
            if images.shape[0] != self.count or labels.shape[0] != self.count or images.shape[2:] != labels.shape[1:]:
                raise DataError(self.cache_dir, f"cache arrays {images.shape} / {labels.shape} disagree with "
                                f"meta.json ({self.count} slices)", "rebuild the cache with build_cache")
            self._images, self._labels = images, labels
        return self._images, self._labels

    def __getstate__(self):  # arrays are reopened in each worker process
        state = self.__dict__.copy()
        state["_images"] = state["_labels"] = None
        return state

    def __len__(self) -> int:
        return self.count if self.indices is None else int(self.indices.size)

    def read_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise IndexError(f"indices out of range for {n} slices")
        rows = indices if self.indices is None else self.indices[indices]
        order = np.argsort(rows, kind="stable")  # the file read in its own order, then put in the batch's
        back = np.empty_like(order)
        back[order] = np.arange(order.size)
        images, labels = self._open()
        return torch.from_numpy(images[rows[order]][back]), torch.from_numpy(labels[rows[order]][back])
