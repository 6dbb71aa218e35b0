"""Tests for the surface distances (HD95, ASD) and the voxel spacing of an affine."""

import numpy as np
import pytest

from autocnnp.training.surface import (
    _distances,
    class_surface_distances,
    surface_distances,
    voxel_spacing,
)

SPACING = (2.0, 0.5)


def square(top: int, left: int, shape=(12, 12), size: int = 4) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


# Truth: 4x4 square at rows 2-5, cols 2-5; its surface is the ring of 12 voxels (the 2x2 interior
# survives the erosion). Spacing 2.0 mm along rows, 0.5 mm along columns.
#
# Prediction shifted by 2 rows (rows 4-7). Distances pred ring -> truth ring:
#   row 4 (cols 2-5): 0, 0.5, 0.5, 0   (cols 3, 4 are interior of the truth; nearest is one column away)
#   row 5 (cols 2, 5): 0, 0            (the truth's bottom edge)
#   row 6 (cols 2, 5): 2, 2            (one row up)
#   row 7 (cols 2-5): 4, 4, 4, 4       (two rows up)
# truth -> pred is the same multiset by symmetry. Sorted: 0 x4, 0.5 x2, 2 x2, 4 x4.
# HD95 = percentile at 0.95 * 11 = 10.45, between sorted[10] = 4 and sorted[11] = 4 -> 4.
# ASD = (2 * 0.5 + 2 * 2 + 4 * 4) / 12 = 21 / 12 = 1.75.
#
# Prediction shifted by 2 columns (cols 4-7). Distances pred ring -> truth ring:
#   col 4 (rows 2-5): 0, 0.5, 0.5, 0   (rows 3, 4: one column to the truth's right edge; a row away is 2)
#   col 5 (rows 2, 5): 0, 0
#   col 6 (rows 2, 5): 0.5, 0.5
#   col 7 (rows 2-5): 1, 1, 1, 1
# HD95 = 1; ASD = (4 * 0.5 + 4 * 1) / 12 = 0.5.
@pytest.mark.parametrize(("pred", "hd95", "asd"), [(square(4, 2), 4.0, 1.75), (square(2, 4), 1.0, 0.5)])
def test_shifted_squares_by_hand(pred, hd95, asd):
    assert surface_distances(pred, square(2, 2), SPACING) == pytest.approx((hd95, asd))
    assert surface_distances(square(2, 2), pred, SPACING) == pytest.approx((hd95, asd))


def test_percentile_interpolates_and_asd_pools_both_directions():
    # One row of 5 voxels: every voxel is a surface voxel. Truth = column 0, prediction = all 5.
    # pred -> truth: 0, 0.5, 1, 1.5, 2; truth -> pred: 0.
    # HD95 = max(percentile([0, .5, 1, 1.5, 2], 95), 0): index 0.95 * 4 = 3.8 -> 1.5 + 0.8 * 0.5 = 1.9.
    # ASD = (0 + 0.5 + 1 + 1.5 + 2 + 0) / 6 = 5 / 6 (not the mean of the two directed means, 0.5).
    pred = np.ones((1, 5), dtype=bool)
    truth = np.zeros((1, 5), dtype=bool)
    truth[0, 0] = True
    assert surface_distances(pred, truth, SPACING) == pytest.approx((1.9, 5 / 6))


def test_identical_masks_are_zero():
    mask = square(3, 1)
    assert surface_distances(mask, mask, SPACING) == (0.0, 0.0)


def test_empty_masks():
    empty = np.zeros((5, 6, 7), dtype=bool)
    mask = empty.copy()
    mask[2, 3, 4] = True
    assert surface_distances(empty, empty, (1.0, 1.0, 1.0)) == (0.0, 0.0)
    assert surface_distances(mask, empty, (1.0, 1.0, 1.0)) == (np.inf, np.inf)
    assert surface_distances(empty, mask, (1.0, 1.0, 1.0)) == (np.inf, np.inf)


@pytest.mark.parametrize(
    ("truth", "spacing", "match"),
    [
        (np.zeros((4, 5), dtype=bool), (1.0, 1.0), "shapes differ"),
        (np.zeros((4, 4), dtype=bool), (1.0, 1.0, 1.0), "spacing must be 2"),
        (np.zeros((4, 4), dtype=bool), (1.0, 0.0), "spacing must be 2"),
    ],
)
def test_bad_arguments(truth, spacing, match):
    with pytest.raises(ValueError, match=match):
        surface_distances(np.zeros((4, 4), dtype=bool), truth, spacing)


def test_one_dimensional_masks_are_refused():
    with pytest.raises(ValueError, match="2D or 3D"):
        surface_distances(np.ones(4, dtype=bool), np.ones(4, dtype=bool), (1.0,))


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside the mask or outside the array."""
    padded = np.pad(mask, 1)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    all_neighbours_in = np.ones_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            shifted = list(inner)
            shifted[axis] = slice(1 + step, padded.shape[axis] - 1 + step)
            all_neighbours_in &= padded[tuple(shifted)]
    return mask & ~all_neighbours_in


def brute_distances(pred: np.ndarray, truth: np.ndarray, spacing) -> tuple[float, float]:
    """O(n^2) pairwise distances between the surface voxel coordinates, in mm."""
    a = np.argwhere(brute_surface(pred)) * np.asarray(spacing)
    b = np.argwhere(brute_surface(truth)) * np.asarray(spacing)
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))
    a_to_b, b_to_a = pairwise.min(axis=1), pairwise.min(axis=0)
    hd95 = max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))
    return hd95, np.concatenate([a_to_b, b_to_a]).mean()


def random_mask(rng: np.random.Generator, shape) -> np.ndarray:
    mask = rng.random(shape) < rng.uniform(0.2, 0.7)
    mask.flat[rng.integers(mask.size)] = True
    return mask


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("shape", [(9, 11), (6, 7, 8)])
def test_matches_brute_force(seed, shape):
    rng = np.random.default_rng(seed)
    spacing = tuple(rng.uniform(0.3, 3.0, size=len(shape)))
    pred, truth = random_mask(rng, shape), random_mask(rng, shape)
    assert surface_distances(pred, truth, spacing) == pytest.approx(brute_distances(pred, truth, spacing), rel=1e-12)


def blob(rng: np.random.Generator, shape, corner, size) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    box = tuple(slice(c, c + s) for c, s in zip(corner, size))
    mask[box] = rng.random(size) < 0.6
    mask[corner] = True
    return mask


# inside the array, and touching its faces (where the margin is clipped: those voxels stay surface voxels)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape,spacing,boxes", [
    ((24, 30, 20), (1.2, 0.8, 2.5), (((5, 9, 4), (6, 7, 5)), ((8, 11, 6), (5, 6, 6)))),
    ((10, 12, 9), (0.7, 1.0, 1.9), (((0, 0, 3), (5, 6, 6)), ((4, 5, 0), (6, 7, 5)))),
], ids=["inside", "at-the-border"])
def test_bounding_box_crop_changes_nothing(seed, shape, spacing, boxes):
    rng = np.random.default_rng(seed)
    pred, truth = (blob(rng, shape, corner, size) for corner, size in boxes)
    assert surface_distances(pred, truth, spacing) == _distances(pred, truth, spacing)
    assert surface_distances(pred, truth, spacing) == pytest.approx(brute_distances(pred, truth, spacing), rel=1e-12)


def test_zero_padding_changes_nothing():
    rng = np.random.default_rng(0)
    pred, truth = random_mask(rng, (5, 6, 7)), random_mask(rng, (5, 6, 7))
    padding = ((3, 8), (0, 5), (11, 2))
    spacing = (1.5, 0.9, 2.2)
    padded = surface_distances(np.pad(pred, padding), np.pad(truth, padding), spacing)
    assert padded == pytest.approx(surface_distances(pred, truth, spacing), rel=1e-12)


def rotation(axis, angle: float) -> np.ndarray:
    """Rodrigues' rotation matrix about ``axis`` by ``angle`` radians."""
    x, y, z = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


@pytest.mark.parametrize(
    ("linear", "expected"),
    [
        (np.diag([0.9, 1.1, 3.0]), (0.9, 1.1, 3.0)),
        (np.diag([-1.0, -1.0, 2.5]), (1.0, 1.0, 2.5)),  # LPS-style flips
        (rotation((1.0, 2.0, -0.5), 0.7) @ np.diag([0.8, 1.2, 3.0]), (0.8, 1.2, 3.0)),  # oblique
    ],
)
def test_voxel_spacing(linear, expected):
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = (-90.0, 126.0, -72.0)
    assert voxel_spacing(affine) == pytest.approx(expected, rel=1e-12)
    assert all(type(size) is float for size in voxel_spacing(affine))


def test_voxel_spacing_needs_4x4():
    with pytest.raises(ValueError, match="4x4"):
        voxel_spacing(np.eye(3))


def test_class_surface_distances():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, size=(6, 7, 8))
    pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, 3, size=truth.shape))
    pred[pred == 2] = 1  # class 2 only in truth
    spacing = (1.0, 0.5, 2.0)
    result = class_surface_distances(pred, truth, spacing, classes=[1, 2, 3])
    assert list(result) == [1, 2, 3]
    assert result[1] == surface_distances(pred == 1, truth == 1, spacing)
    assert result[1] == pytest.approx(brute_distances(pred == 1, truth == 1, spacing), rel=1e-12)
    assert result[2] == (np.inf, np.inf)
    assert result[3] == (0.0, 0.0)  # absent from both
