"""Surface distances between binary masks: HD95 and average surface distance (ASD), in mm.

Definitions follow MONAI (``monai.metrics`` ``compute_hausdorff_distance(percentile=95)`` and
``compute_average_surface_distance(symmetric=True)``):

* surface of a mask: ``mask ^ scipy.ndimage.binary_erosion(mask)`` (cross structuring element,
  so mask voxels on the array border are surface voxels);
* directed distances A -> B: from every surface voxel of A to the nearest surface voxel of B,
  Euclidean in mm with the voxel spacing (``distance_transform_edt(~surface_B, sampling=spacing)``);
* HD95: the larger of the two directed 95th percentiles (numpy's linear interpolation);
* ASD: the mean of both directed distance arrays concatenated.

Empty masks: both empty gives ``(0.0, 0.0)`` (agreement on "nothing there"); exactly one empty
gives ``(inf, inf)``. MONAI returns inf or NaN in these cases; BraTS evaluations substitute a
large constant for a one-empty HD95 (374 mm in BraTS 2023, about the diagonal of the
240 x 240 x 155 mm volume).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes in mm of a 4x4 NIfTI affine: the norms of the columns of ``affine[:3, :3]``."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    x, y, z = np.linalg.norm(affine[:3, :3], axis=0)
    return float(x), float(y), float(z)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask ^ ndimage.binary_erosion(mask)


def _distances(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """(HD95, ASD) of two non-empty boolean masks, without cropping."""
    pred_surface, truth_surface = _surface(pred), _surface(truth)
    pred_to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=spacing)[pred_surface]
    truth_to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[truth_surface]
    hd95 = max(np.percentile(pred_to_truth, 95), np.percentile(truth_to_pred, 95))
    asd = np.concatenate([pred_to_truth, truth_to_pred]).mean()
    return float(hd95), float(asd)


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the bounding box of a non-empty mask, grown by ``margin`` voxels within the array."""
    box = []
    for axis, size in enumerate(mask.shape):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(hits[0] - margin, 0), min(hits[-1] + 1 + margin, size)))
    return tuple(box)


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """``(hd95, asd)`` in mm of two boolean masks of the same 2D or 3D shape (empty-mask rules: module docstring).

    Both masks are cropped to their joint bounding box plus one voxel before the
    distance transforms; this does not change the result.
    """
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth shapes differ: {pred.shape} vs {truth.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got {pred.ndim}D")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be {pred.ndim} positive numbers, got {spacing}")
    if not pred.any() and not truth.any():
        return 0.0, 0.0
    if not pred.any() or not truth.any():
        return float("inf"), float("inf")
    box = _bounding_box(pred | truth, margin=1)
    return _distances(pred[box], truth[box], spacing)


def class_surface_distances(
    pred_labels: np.ndarray, truth_labels: np.ndarray, spacing: Sequence[float], classes: Iterable[int]
) -> dict[int, tuple[float, float]]:
    """``(hd95, asd)`` per class value ``c``: ``surface_distances(pred_labels == c, truth_labels == c, spacing)``."""
    pred_labels, truth_labels = np.asarray(pred_labels), np.asarray(truth_labels)
    return {int(c): surface_distances(pred_labels == c, truth_labels == c, spacing) for c in classes}
