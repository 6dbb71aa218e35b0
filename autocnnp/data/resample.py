"""Resampling for 3D training: one case to the target spacing and back (the spacing itself: data/spacing.py).

A 3D case is trained on at one target spacing (default: the median spacing of the training cases, as
nnU-Net does). :func:`preprocess_volume` is *the* training pre-processing of one case: the volume cache
builds every training case with it and ``predict`` feeds every volume through it, so both see the same
voxels. Its output layout is ``[C, D, H, W]`` with ``D`` the volume's third axis (Z, the 2D path's slice
axis), ``H`` its first (X) and ``W`` its second (Y): the 2D path's ``[C, X, Y]`` with depth first.
Images are z-scored (over each channel's non-zero voxels) on the source grid, then resampled trilinearly;
labels with nearest neighbour, so no new label value appears. :func:`to_source` takes class
probabilities ``[K, D, H, W]`` back to the source grid ``(X, Y, Z)``, a few source slices at a time
(:func:`to_source_both`: labels and probabilities in one pass).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .slices import CHUNK_BYTES, zscore_stats, zscored
from .spacing import model_shape, resampled_shape


def _interpolate(volume: torch.Tensor, shape, label: bool) -> torch.Tensor:
    """``volume [N, D, H, W]`` resized to ``shape`` (trilinear, or nearest for labels)."""
    if tuple(volume.shape[1:]) == tuple(shape):
        return volume
    with torch.no_grad():
        if label:
            return F.interpolate(volume[None].float(), size=tuple(shape), mode="nearest-exact")[0]
        return F.interpolate(volume[None], size=tuple(shape), mode="trilinear", align_corners=False)[0]


def preprocess_volume(image: np.ndarray, spacing, target_spacing, modalities, normalise: bool) -> np.ndarray:
    """The training pre-processing of one case: a channels-last image ``(X, Y, Z, C)`` (any dtype, as stored)
    of voxel ``spacing`` ``(x, y, z)`` mm as float32 ``[C, D, H, W]`` = ``[C, Z, X, Y]`` at ``target_spacing``:
    channels ``modalities`` (indices; None: all), each z-scored over its non-zero voxels when ``normalise``,
    resampled trilinearly (a channel at a time)."""
    image = image[..., None] if image.ndim == 3 else image
    channels = list(range(image.shape[-1])) if modalities is None else [int(m) % image.shape[-1] for m in modalities]
    shape = model_shape(resampled_shape(image.shape, spacing, target_spacing))
    out = np.empty((len(channels),) + shape, np.float32)
    for k, c in enumerate(channels):
        channel = image[..., c]
        values = zscored(channel, *zscore_stats(channel)) if normalise else np.asarray(channel, np.float32)
        moved = torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1)))
        out[k] = _interpolate(moved[None], shape, label=False)[0].numpy()
    return out


def preprocess_label(label: np.ndarray, spacing, target_spacing) -> np.ndarray:
    """A label map ``(X, Y, Z)`` as uint8 ``[D, H, W]`` at ``target_spacing`` (nearest neighbour: only values of
    the input)."""
    shape = model_shape(resampled_shape(label.shape, spacing, target_spacing))
    moved = torch.from_numpy(np.ascontiguousarray(np.asarray(label, np.uint8).transpose(2, 0, 1)))
    return _interpolate(moved[None], shape, label=True)[0].to(torch.uint8).numpy()


def to_source(probabilities, shape, *, labels: bool = False, chunk_bytes: int = CHUNK_BYTES) -> np.ndarray:
    """Class probabilities (or logits) ``[K, D, H, W]`` on the model's grid back on the source grid ``shape``
    ``(X, Y, Z)``: float32 ``(X, Y, Z, K)``, or with ``labels`` the uint8 argmax ``(X, Y, Z)`` (see
    :func:`to_source_both`)."""
    argmax, probs = to_source_both(probabilities, shape, labels=labels, keep=not labels, chunk_bytes=chunk_bytes)
    return argmax if labels else probs


def to_source_both(probabilities, shape, *, labels: bool = True, keep: bool = False,
                   chunk_bytes: int = CHUNK_BYTES) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(labels, probabilities)`` of :func:`to_source` in one pass, each only where asked (else None). Trilinear
    (``align_corners=False``, as :func:`preprocess_volume`), computed separably a few source slices at a time:
    beyond the outputs, memory stays within about ``chunk_bytes``."""
    probs = torch.as_tensor(probabilities).float()
    k, depth = probs.shape[:2]
    x, y, z = (int(s) for s in shape[:3])
    argmax = np.empty((x, y, z), np.uint8) if labels else None
    out = np.empty((x, y, z, k), np.float32) if keep else None
    step = max(1, chunk_bytes // max(1, 2 * k * x * y * 4))
    scale = depth / z
    for lo in range(0, z, step):
        zs = np.arange(lo, min(z, lo + step))
        src = np.clip((zs + 0.5) * scale - 0.5, 0, depth - 1)
        below = np.floor(src).astype(np.int64)
        above = np.minimum(below + 1, depth - 1)
        weight = torch.from_numpy((src - below).astype(np.float32))[None, :, None, None]
        planes = probs[:, below] * (1 - weight) + probs[:, above] * weight  # [K, n, H, W]
        planes = _interpolate(planes, (len(zs), x, y), label=False)  # in-plane only: depth is already n
        part = planes.permute(2, 3, 1, 0)  # [X, Y, n, K]
        if argmax is not None:
            argmax[:, :, lo:lo + len(zs)] = part.argmax(-1).to(torch.uint8).numpy()
        if out is not None:
            out[:, :, lo:lo + len(zs)] = part.numpy()
    return argmax, out
