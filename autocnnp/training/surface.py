"""Surface distances between binary masks: HD95 and average surface distance (ASD), in mm.

Definitions follow MONAI (``monai.metrics`` ``compute_hausdorff_distance(percentile=95)`` and
``compute_average_surface_distance(symmetric=True)``):

* surface of a mask: ``mask ^ scipy.ndimage.binary_erosion(mask)`` (cross structuring element,
  so mask voxels on the array border are surface voxels);
* directed distances A -> B: from every surface voxel of A to the nearest surface voxel of B,
  Euclidean in mm with the voxel spacing (``distance_transform_edt(~surface_B, sampling=spacing)``);
* HD95: the larger of the two directed 95th percentiles (numpy's linear interpolation);
* ASD: the mean of both directed distance arrays concatenated.

The distances are computed from the surface voxels alone (a k-d tree of each surface, within the
masks' joint bounding box), which gives the same numbers as the whole-volume distance transforms.

Empty masks: both empty gives ``(0.0, 0.0)`` (agreement on "nothing there"); exactly one empty
gives ``(inf, inf)``. MONAI returns inf or NaN in these cases; BraTS evaluations substitute a
large constant for a one-empty HD95 (373.13 mm, the diagonal of the 240 x 240 x 155 mm volume;
``image_diagonal``), as ``autocnnp evaluate`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes in mm of a 4x4 NIfTI affine: the norms of the columns of ``affine[:3, :3]``."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    x, y, z = np.linalg.norm(affine[:3, :3], axis=0)
    return float(x), float(y), float(z)


def _surface_points(mask: np.ndarray, spacing: Sequence[float], origin: Sequence[int]) -> np.ndarray:
    """Coordinates in mm ``[N, ndim]`` of the surface voxels of ``mask`` (a view is fine), whose first voxel lies
    at index ``origin`` of the volume (so a crop changes no digit). Surface voxels: the voxels with a face
    neighbour outside it or outside the array, i.e. ``mask ^ binary_erosion(mask)`` with a cross, without
    scipy's generic erosion (a few boolean ANDs of shifted views, one box-sized array)."""
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    surface = np.array(mask, dtype=bool)  # C order: a Fortran-ordered volume is passed transposed
    interior = surface[core].copy()
    for axis in range(mask.ndim):
        for step in (-1, 1):
            shifted = list(core)
            shifted[axis] = slice(1 + step, mask.shape[axis] - 1 + step)
            interior &= mask[tuple(shifted)]
    surface[core] &= np.logical_not(interior, out=interior)
    del interior
    return (np.argwhere(surface) + np.asarray(origin)) * np.asarray(spacing, dtype=np.float64)


def _distances(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
               origin: Sequence[int] = (0, 0, 0)) -> tuple[float, float]:
    """(HD95, ASD) of two non-empty boolean masks (a crop whose first voxel is ``origin``): each surface voxel's
    distance to the nearest surface voxel of the other mask, found in a k-d tree of the surface voxels (exact, as
    a Euclidean distance transform would give, in memory and time that grow with the surfaces, not the volume)."""
    from scipy.spatial import cKDTree

    pred_surface, truth_surface = (_surface_points(m, spacing, origin[:m.ndim]) for m in (pred, truth))
    pred_to_truth = cKDTree(truth_surface).query(pred_surface)[0]
    truth_to_pred = cKDTree(pred_surface).query(truth_surface)[0]
    hd95 = max(np.percentile(pred_to_truth, 95), np.percentile(truth_to_pred, 95))
    asd = np.concatenate([pred_to_truth, truth_to_pred]).mean()
    return float(hd95), float(asd)


def _bounding_box(masks: Iterable[np.ndarray], margin: int) -> tuple[slice, ...]:
    """Slices of the joint bounding box of non-empty masks, grown by ``margin`` voxels within the array."""
    masks = list(masks)
    box = []
    for axis, size in enumerate(masks[0].shape):
        others = tuple(a for a in range(masks[0].ndim) if a != axis)
        hits = np.flatnonzero(np.logical_or.reduce([m.any(axis=others) for m in masks]))
        box.append(slice(max(hits[0] - margin, 0), min(hits[-1] + 1 + margin, size)))
    return tuple(box)


def image_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The diagonal of an image in mm, longer than any distance between two of its voxels: the HD95 and ASD
    a report counts for a class one mask misses (BraTS: 373.13 mm for 240 x 240 x 155 voxels of 1 mm)."""
    return float(np.linalg.norm(np.asarray(shape, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)))


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """``(hd95, asd)`` in mm of two boolean masks of the same 2D or 3D shape (empty-mask rules: module docstring).

    Only the joint bounding box of the masks plus one voxel is looked at (views, no copies of the volume);
    this does not change the result.
    """
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth shapes differ: {pred.shape} vs {truth.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got {pred.ndim}D")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be {pred.ndim} positive numbers, got {spacing}")
    if pred.flags.f_contiguous and not pred.flags.c_contiguous:  # as NIfTI stores a volume: walk it in memory order
        pred, truth, spacing = pred.T, truth.T, spacing[::-1]
    has_pred, has_truth = pred.any(), truth.any()
    if not has_pred and not has_truth:
        return 0.0, 0.0
    if not has_pred or not has_truth:
        return float("inf"), float("inf")
    box = _bounding_box((pred, truth), margin=1)
    return _distances(pred[box], truth[box], spacing, [b.start for b in box])


def class_surface_distances(
    pred_labels: np.ndarray, truth_labels: np.ndarray, spacing: Sequence[float], classes: Iterable[int]
) -> dict[int, tuple[float, float]]:
    """``(hd95, asd)`` per class value ``c``: ``surface_distances(pred_labels == c, truth_labels == c, spacing)``."""
    pred_labels, truth_labels = np.asarray(pred_labels), np.asarray(truth_labels)
    return {int(c): surface_distances(pred_labels == c, truth_labels == c, spacing) for c in classes}
