"""ImgMed: turning 3D/4D NIfTI cases into a fast on-disk cache of 2D training slices.

The thesis' pre-processing (section 2.3 and ImgMed, section 3.3.2.1): keep some modalities
(BraTS was reduced to T1w), extract N 2D slices per scan (70 in the thesis), resize them
(512 x 512 for the left atrium) and z-score the intensities. :func:`build_cache` does this once
and writes ``images.npy`` (float32 ``[N, C, H, W]``), ``labels.npy`` (uint8 ``[N, H, W]``) and
``meta.json`` into a cache folder; :class:`CacheDataset` serves the slices to PyTorch from
memory-mapped files, touching only the slices it is asked for.

Cache building is idempotent and safe to run from many processes at once (all ranks of a job may
call it): the build holds an exclusive ``fcntl.flock`` on ``cache_dir/.lock``, writes into a
temporary folder inside ``cache_dir`` and renames the files into place, ``meta.json`` last; a
second call whose content key (a hash of the parameters and of the source files' paths, sizes and
modification times) matches ``meta.json`` returns at once without writing anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..core.errors import DataError
from ..core.files import exclusive_lock, read_json
from .checks import Verdict
from .index import Case, read_dataset
from .volumes import label_shape, load_case, open_nifti, read_array

MODES: tuple[str, ...] = ("even", "labelled", "mixed")
CACHE_FORMAT = 1
IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
META_FILE = "meta.json"
LOCK_FILE = ".lock"
_TMP_PREFIX = ".tmp-"


# --------------------------------------------------------------------------------------------
# Slice selection

def _even(lo: int, hi: int, n: int | None) -> np.ndarray:
    """``n`` distinct, evenly spread integers in ``[lo, hi]`` (all of them when ``n`` is too big)."""
    count = hi - lo + 1
    if n is None or n <= 0 or n >= count:
        return np.arange(lo, hi + 1, dtype=np.int64)
    if n == 1:
        return np.array([(lo + hi) // 2], dtype=np.int64)
    # floor(x + 0.5) (not banker's rounding) keeps the indices distinct when the step is >= 1.
    return np.floor(np.linspace(lo, hi, n) + 0.5).astype(np.int64)


def _spread(pool: np.ndarray, n: int) -> np.ndarray:
    """``n`` evenly spread entries of the sorted index array ``pool`` (none when ``n`` is 0)."""
    return pool[_even(0, pool.size - 1, n)] if n > 0 else pool[:0]


def check_fraction(fraction) -> float:
    """``fraction`` as a float in ``[0, 1]``, else a ValueError saying so."""
    value = float(fraction)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"foreground_fraction must be between 0 and 1, got {fraction!r}")
    return value


def slice_indices(depth: int, n_slices: int | None, mode: str = "even", label=None, axis: int = 2,
                  foreground_fraction: float = 0.5) -> np.ndarray:
    """Indices of the slices to take along ``axis`` of a volume ``depth`` slices deep.

    ``mode="even"`` spreads ``n_slices`` evenly over the whole volume; ``mode="labelled"`` spreads
    them evenly between the first and the last slice holding a non-zero label; ``mode="mixed"``
    spreads ``round(foreground_fraction * n_slices)`` (half up) of them evenly over the slices that
    hold a non-zero label and the rest evenly over the slices that hold none, the other group
    filling up when one has too few (nnU-Net-style foreground oversampling that still shows the
    model background). Both fall back to ``"even"`` when the label map is empty. ``n_slices`` of
    ``None``/``0``, or more than there are slices, takes every slice once (indices never repeat).
    Sorted, distinct int64 indices.
    """
    if mode not in MODES:
        raise ValueError(f"slice mode must be one of {', '.join(MODES)}, got {mode!r}")
    if depth < 1:
        raise ValueError(f"cannot take slices of a volume with {depth} slices")
    fraction = check_fraction(foreground_fraction)
    if mode == "even":
        return _even(0, int(depth) - 1, n_slices)
    if label is None:
        raise ValueError(f"mode {mode!r} needs the label map")
    label = np.asarray(label)
    other = tuple(a for a in range(label.ndim) if a != axis % label.ndim)
    hit = np.flatnonzero(np.any(label > 0, axis=other))
    if not hit.size:
        return _even(0, int(depth) - 1, n_slices)
    if mode == "labelled":
        return _even(int(hit[0]), int(hit[-1]), n_slices)
    if not n_slices or n_slices >= depth:
        return np.arange(int(depth), dtype=np.int64)
    empty = np.setdiff1d(np.arange(int(depth), dtype=np.int64), hit)
    n_fg = min(max(int(np.floor(fraction * n_slices + 0.5)), n_slices - empty.size), hit.size)
    return np.sort(np.concatenate([_spread(hit.astype(np.int64), n_fg), _spread(empty, n_slices - n_fg)]))


def _channels_last(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3:
        return image[..., None]
    if image.ndim != 4:
        raise ValueError(f"expected an image (X, Y, Z) or (X, Y, Z, C), got shape {image.shape}")
    return image


def take_slices(image, label, indices, axis: int = 2):
    """2D slices ``indices`` along spatial ``axis``: images ``[N, C, H, W]``, labels ``[N, H, W]`` or None."""
    image = _channels_last(image)
    idx = np.asarray(indices, dtype=np.int64)
    imgs = np.moveaxis(np.take(image, idx, axis=axis), axis, 0)  # [N, h, w, C]
    imgs = np.ascontiguousarray(np.moveaxis(imgs, -1, 1))  # [N, C, H, W]
    labs = None
    if label is not None:
        labs = np.ascontiguousarray(np.moveaxis(np.take(np.asarray(label), idx, axis=axis), axis, 0))
    return imgs, labs


def extract_slices(image, label, n_slices: int | None, mode: str = "even", axis: int = 2,
                   foreground_fraction: float = 0.5):
    """Pick ``n_slices`` slices (see :func:`slice_indices`) and return ``(indices, images, labels)``.

    ``image`` is ``(X, Y, Z)`` or channels last ``(X, Y, Z, C)``; ``images`` is ``[N, C, H, W]``
    and ``labels`` ``[N, H, W]`` (``None`` when ``label`` is ``None``).
    """
    image = _channels_last(image)
    indices = slice_indices(image.shape[axis], n_slices, mode, label=label, axis=axis,
                            foreground_fraction=foreground_fraction)
    imgs, labs = take_slices(image, label, indices, axis=axis)
    return indices, imgs, labs


# --------------------------------------------------------------------------------------------
# Modalities, resizing, normalisation

def parse_modalities(text: str) -> list[str] | None:
    """``"all"`` (or empty) -> ``None`` (keep every channel); ``"FLAIR, 2"`` -> ``["FLAIR", "2"]``."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts or (len(parts) == 1 and parts[0].lower() == "all"):
        return None
    if any(p.lower() == "all" for p in parts):
        raise DataError(None, f"modalities {text!r} mixes 'all' with modality names",
                        "write either all or a comma-separated list of modality names or channel indices")
    return parts


def select_modalities(image, modalities) -> np.ndarray:
    """Keep the channels ``modalities`` (a list of indices; ``None`` keeps all) of a channels-last image."""
    image = _channels_last(image)
    if modalities is None:
        return image
    mods = [int(m) for m in modalities]
    n = image.shape[-1]
    bad = [m for m in mods if not -n <= m < n]
    if bad or not mods:
        raise ValueError(f"modalities {mods} do not fit an image with {n} channel(s)")
    return image[..., mods]


def _size2(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size}")
    return h, w


def resize(image, size, *, label: bool = False) -> np.ndarray:
    """Resize the last two axes (H, W) of ``image`` to ``size`` (an int or ``(H, W)``).

    Works on ``[H, W]``, ``[C, H, W]`` or ``[N, C, H, W]`` numpy arrays. Images are resampled
    bilinearly with pixel centres aligned (``align_corners=False``; anti-aliased when shrinking)
    and returned as float32; ``label=True`` uses nearest neighbour (``nearest-exact``), so the
    output holds only values of the input and keeps its dtype.
    """
    arr = np.asarray(image)
    if arr.ndim < 2:
        raise ValueError(f"cannot resize an array of shape {arr.shape}")
    h, w = _size2(size)
    lead = arr.shape[:-2]
    if arr.shape[-2:] == (h, w):
        return arr.copy() if label else arr.astype(np.float32, copy=True)
    flat = torch.from_numpy(np.ascontiguousarray(arr.reshape((-1, 1) + arr.shape[-2:]), dtype=np.float32))
    with torch.no_grad():
        if label:
            out = F.interpolate(flat, size=(h, w), mode="nearest-exact")
        else:
            shrink = h < arr.shape[-2] or w < arr.shape[-1]
            out = F.interpolate(flat, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
    out = out.numpy().reshape(lead + (h, w))
    return out.astype(arr.dtype) if label else out


def zscore(image, *, eps: float = 1e-8) -> np.ndarray:
    """Z-score each channel of a channels-last image over its non-zero voxels.

    Zero voxels (e.g. outside the skull-stripped brain) stay zero; a constant channel is only
    centred. Returns float32.
    """
    image = _channels_last(image).astype(np.float32, copy=True)
    for c in range(image.shape[-1]):
        ch = image[..., c]
        mask = ch != 0
        if not mask.any():
            continue
        vals = ch[mask].astype(np.float64)
        mean, std = vals.mean(), vals.std()
        ch[mask] = ((vals - mean) / (std if std > eps else 1.0)).astype(np.float32)
    return image


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
    normalise: bool = True,
    case_indices=None,
    axis: int = 2,
    foreground_fraction: float = 0.5,
) -> Path:
    """Build (or reuse) the 2D slice cache of the labelled cases of dataset ``root``.

    ``root`` is anything :func:`~autocnnp.data.decathlon.read_dataset` accepts. ``n_slices`` slices
    per case are taken along ``axis`` (``mode`` ``"even"``, ``"labelled"`` or ``"mixed"`` with
    ``foreground_fraction``, see :func:`slice_indices`; ``None``/``0`` takes all), restricted to the
    channels ``modalities`` (indices or modality names from dataset.json; ``None`` keeps all),
    z-scored per case and channel when ``normalise``, and resized to ``size`` (int or ``(H, W)``). ``case_indices``
    picks training cases by position in the index (``None``: all). Returns ``cache_dir``.

    A second call with the same inputs is a no-op. Concurrent calls (several ranks or processes)
    serialise on an exclusive lock of ``cache_dir/.lock``; the losers wait and reuse the cache.
    """
    if mode not in MODES:
        raise ValueError(f"slice mode must be one of {', '.join(MODES)}, got {mode!r}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    fraction = check_fraction(foreground_fraction)
    h, w = _size2(size)
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

    params = {
        "format": CACHE_FORMAT,
        "n_slices": None if not n_slices else int(n_slices),
        "size": [h, w],
        "modalities": mods,
        "mode": mode,
        "normalise": bool(normalise),
        "axis": axis,
        "foreground_fraction": fraction,
        "cases": [[c.name] + _stat(Path(c.image)) + _stat(Path(c.label)) for c in cases],
    }
    key = cache_key(params)
    out = Path(cache_dir)
    if _is_current(out, key):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out / LOCK_FILE):
        if _is_current(out, key):  # someone else built it while we waited
            return out
        for stale in out.glob(_TMP_PREFIX + "*"):  # left by a crashed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_cache(tmp, cases, params, key, ds, mods, (h, w))
            _commit(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _plan(case: Case, mode: str, n_slices, axis: int, foreground_fraction: float) -> np.ndarray:
    """Slice indices of one case, reading only the header (and the label unless ``mode`` is 'even')."""
    img = open_nifti(Path(case.image))
    label = None
    if mode != "even":
        path = Path(case.label)
        lab = open_nifti(path)
        label = read_array(path, lab).reshape(label_shape(path, lab.shape))
    return slice_indices(img.shape[axis], n_slices, mode, label=label, axis=axis,
                         foreground_fraction=foreground_fraction)


def _write_cache(tmp: Path, cases, params, key, ds, mods, size) -> dict:
    h, w = size
    plans = [_plan(c, params["mode"], params["n_slices"], params["axis"], params["foreground_fraction"]) for c in cases]
    total = int(sum(len(p) for p in plans))
    images = labels = None
    slice_case: list[int] = []
    slice_index: list[int] = []
    counts = np.zeros(256, dtype=np.int64)
    case_meta = []
    pos = 0
    channels = None
    try:
        for ci, (case, idx) in enumerate(zip(cases, plans)):
            image, label, _, _ = load_case(case)
            if mods is not None:
                n = image.shape[-1]
                if any(not 0 <= m < n for m in mods):
                    raise DataError(case.image, f"image has {n} channel(s); modalities {mods} were asked for",
                                    "pick modalities that every image has")
                image = image[..., mods]
            if channels is None:
                channels = image.shape[-1]
                images = np.lib.format.open_memmap(tmp / IMAGES_FILE, mode="w+", dtype=np.float32,
                                                   shape=(total, channels, h, w))
                labels = np.lib.format.open_memmap(tmp / LABELS_FILE, mode="w+", dtype=np.uint8,
                                                   shape=(total, h, w))
            elif image.shape[-1] != channels:
                raise DataError(case.image, f"image has {image.shape[-1]} channel(s), earlier cases have {channels}",
                                "give every case the same modalities, or select modalities")
            if label.min() < 0 or label.max() > 255:
                raise DataError(case.label, f"label values range {label.min()}..{label.max()} does not fit 0..255",
                                "store class indices 0..255")
            if params["normalise"]:
                image = zscore(image)
            imgs, labs = take_slices(image, label, idx, axis=params["axis"])
            del image, label
            images[pos:pos + len(idx)] = resize(imgs, (h, w))
            labs = resize(labs.astype(np.uint8), (h, w), label=True)
            labels[pos:pos + len(idx)] = labs
            counts += np.bincount(labs.ravel(), minlength=256)
            slice_case.extend([ci] * len(idx))
            slice_index.extend(int(i) for i in idx)
            case_meta.append({"name": case.name, "image": str(Path(case.image).resolve()),
                              "label": str(Path(case.label).resolve()), "slices": int(len(idx))})
            pos += len(idx)
        images.flush()
        labels.flush()
    finally:
        del images, labels
    top = int(np.flatnonzero(counts).max()) if counts.any() else 0
    meta = {
        "format": CACHE_FORMAT,
        "key": key,
        "count": total,
        "channels": int(channels),
        "size": [h, w],
        "dtype": {"images": "float32", "labels": "uint8"},
        "source": str(ds.index_file.resolve()),
        "dataset": ds.name,
        "modalities": mods if mods is not None else list(range(int(channels))),
        "modality_names": [ds.modalities.get(m, str(m)) for m in (mods if mods is not None else range(int(channels)))],
        "labels": {str(k): v for k, v in ds.labels.items()},
        "label_counts": counts[: top + 1].tolist(),
        "params": {k: v for k, v in params.items() if k != "cases"},
        "cases": case_meta,
        "slice_case": slice_case,
        "slice_index": slice_index,
    }
    (tmp / META_FILE).write_text(json.dumps(meta))
    return meta


def _commit(tmp: Path, out: Path) -> None:
    """Move a finished build into place; ``meta.json`` goes last so a matching meta means complete data."""
    try:
        (out / META_FILE).unlink()
    except FileNotFoundError:
        pass
    os.replace(tmp / IMAGES_FILE, out / IMAGES_FILE)
    os.replace(tmp / LABELS_FILE, out / LABELS_FILE)
    os.replace(tmp / META_FILE, out / META_FILE)


def read_cache_meta(cache_dir) -> dict:
    """The ``meta.json`` of a cache, or a DataError saying to build it."""
    cache_dir = Path(cache_dir)
    meta = _read_meta(cache_dir)
    if meta is None or meta.get("format") != CACHE_FORMAT:
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


class CacheDataset(Dataset):
    """A PyTorch dataset over a cache written by :func:`build_cache`.

    ``dataset[i]`` is ``(image, label)``: a float32 tensor ``[C, H, W]`` and an int64 tensor
    ``[H, W]``. The arrays are memory-mapped (opened lazily, once per process), so only the
    slices asked for are read. ``indices`` restricts the dataset to some cache slices (e.g. a
    train/validation split by case, see :meth:`indices_of_cases`). ``augment``, if given, is called
    as ``augment(image, label, epoch=..., index=...)`` with the cache index of the slice and the
    epoch set by :meth:`set_epoch`, and must return the new ``(image, label)``. ``in_memory`` reads
    the arrays into memory once instead (faster random access; memory grows with the cache).
    """

    def __init__(self, cache_dir, augment=None, indices=None, in_memory: bool = False):
        self.cache_dir = Path(cache_dir)
        self.meta = read_cache_meta(self.cache_dir)
        for name in (IMAGES_FILE, LABELS_FILE):
            if not (self.cache_dir / name).is_file():
                raise DataError(self.cache_dir / name, "cache file is missing", "rebuild the cache with build_cache")
        self.count = int(self.meta["count"])
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices is not None and self.indices.size and (self.indices.min() < 0 or self.indices.max() >= self.count):
            raise IndexError(f"indices out of range for a cache of {self.count} slices")
        self.augment = augment
        self.in_memory = bool(in_memory)
        self.epoch = 0
        self._images = None
        self._labels = None

    @property
    def num_channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.meta["size"])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch passed to ``augment`` (call it with the sampler's ``set_epoch``)."""
        self.epoch = int(epoch)

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

    def __getitem__(self, i):
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} slices")
        j = i if self.indices is None else int(self.indices[i])
        images, labels = self._open()
        image = torch.from_numpy(np.array(images[j], dtype=np.float32))
        label = torch.from_numpy(labels[j].astype(np.int64))
        if self.augment is not None:
            image, label = self.augment(image, label, epoch=self.epoch, index=j)
        return image, label
