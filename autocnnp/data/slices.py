"""From a volume to 2D training slices: which slices (even, labelled, mixed), the modalities kept, the
resize and the z-score, as the thesis' pre-processing does them (section 2.3). The cache of
data/preprocess.py stores what these functions make; predict applies them to the volumes it segments.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import DataError

MODES: tuple[str, ...] = ("even", "labelled", "mixed")


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


def size_pair(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size}")
    return h, w


CHUNK_BYTES = 1 << 26  # predict converts, normalises and resizes a volume's slices this many float32 bytes at a time
_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}


def resize(image, size, *, label: bool = False, dtype=np.float32) -> np.ndarray:
    """Resize the last two axes (H, W) of ``image`` to ``size`` (an int or ``(H, W)``).

    Works on ``[H, W]``, ``[C, H, W]`` or ``[N, C, H, W]`` numpy arrays. Images are resampled
    bilinearly in float32 with pixel centres aligned (``align_corners=False``; anti-aliased when
    shrinking) and returned as ``dtype`` (float32, or float16 rounded by torch); ``label=True`` uses
    nearest neighbour (``nearest-exact``), so the output holds only values of the input and keeps its dtype.
    """
    arr = np.asarray(image)
    if arr.ndim < 2:
        raise ValueError(f"cannot resize an array of shape {arr.shape}")
    h, w = size_pair(size)
    lead = arr.shape[:-2]
    if arr.shape[-2:] == (h, w):
        return arr.copy() if label else arr.astype(dtype, copy=True)
    flat = torch.from_numpy(np.ascontiguousarray(arr.reshape((-1, 1) + arr.shape[-2:]), dtype=np.float32))
    with torch.no_grad():
        if label:
            out = F.interpolate(flat, size=(h, w), mode="nearest-exact")
        else:
            shrink = h < arr.shape[-2] or w < arr.shape[-1]
            out = F.interpolate(flat, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
            out = out.to(_TORCH_DTYPES[np.dtype(dtype)])
    out = out.numpy().reshape(lead + (h, w))
    return out.astype(arr.dtype) if label else out


def zscore_stats(channel, *, eps: float = 1e-8) -> tuple[float, float]:
    """``(mean, scale)`` of the non-zero voxels of one channel, so that ``z = (x - mean) / scale``.

    The sums run in float64 over the voxels as they lie (``count_nonzero``; ``sum`` and ``einsum``
    accumulate in float64), without a boolean-mask copy: zeros add nothing to them. Where the
    one-pass variance could lose digits (std below 1e-4 of the mean) mean and std are recomputed over
    the non-zero voxels in two passes. ``scale`` is the std, or 1 for a constant channel (only
    centred); an all-zero channel gives ``(0, 1)``.
    """
    flat = np.asarray(channel).ravel(order="K")
    n = np.count_nonzero(flat)
    if not n:
        return 0.0, 1.0
    mean = float(flat.sum(dtype=np.float64)) / n
    var = float(np.einsum("i,i->", flat, flat, dtype=np.float64)) / n - mean * mean
    if var <= 1e-8 * mean * mean:
        values = flat[flat != 0].astype(np.float64)
        mean, var = float(values.mean()), float(values.var())
    std = math.sqrt(max(var, 0.0))
    return mean, (std if std > eps else 1.0)


def zscored(x: np.ndarray, mean, scale) -> np.ndarray:
    """``(x - mean) / scale`` computed in float64, 0 where ``x`` is 0, as float32 (``mean``/``scale`` broadcast)."""
    z = np.subtract(x, mean, dtype=np.float64)
    z /= scale
    z[x == 0] = 0.0
    return z.astype(np.float32)


def zscore(image, *, eps: float = 1e-8) -> np.ndarray:
    """Z-score each channel of a channels-last image over its non-zero voxels (:func:`zscore_stats`).

    Zero voxels (e.g. outside the skull-stripped brain) stay zero; a constant channel is only
    centred. Returns float32.
    """
    image = _channels_last(image)
    out = np.empty(image.shape, np.float32)
    for c in range(image.shape[-1]):
        out[..., c] = zscored(image[..., c], *zscore_stats(image[..., c], eps=eps))
    return out
