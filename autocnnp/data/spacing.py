"""Voxel spacing and grids, read from the NIfTI headers only (torch-free: the engine sizes a 3D job's patch
before anything starts): the target spacing, a case's resampled grid, the automatic patch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..core.errors import DataError
from .index import Case
from .volumes import header_spacing, image_shape, open_nifti

PATCH_MULTIPLE = 16  # an automatic patch side is a multiple of this: a U-Net of depth 5 (4 poolings) takes it


def _triple(text: str, auto: str, convert, what: str, unit: str, example: str, where):
    """``None`` for the word ``auto``, else three positive numbers ``convert``-ed from ``"a,b,c"``, or a DataError."""
    if str(text).strip().lower() == auto:
        return None
    try:
        values = tuple(convert(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise DataError(where, f"{what} {text!r} is neither '{auto}' nor three positive {unit}",
                        f"write {what} as '{auto}' or e.g. '{example}'")
    return values


def parse_spacing(text: str, where=None) -> tuple[float, float, float] | None:
    """``"median"`` (None: the training cases' median) or ``"x,y,z"`` in mm."""
    return _triple(text, "median", float, "spacing", "sizes in mm (x, y, z)", "1.0,1.0,3.0", where)


Geometry = tuple[tuple[int, ...], tuple[float, float, float]]
_GEOMETRY: dict[tuple[Path, int, int], Geometry] = {}  # by path, size and mtime: a changed file is read again
_GEOMETRY_LIMIT = 1 << 14


def case_geometry(case: Case) -> Geometry:
    """The shape ``(X, Y, Z, C)`` and spacing ``(x, y, z)`` of a case's image, from its header only: read once per
    process while the file is unchanged (a 3D job's start-up checks the data, then asks for the spacing, the patch and
    the budget)."""
    return file_geometry(Path(case.image))


def file_geometry(path: Path, img=None) -> Geometry:
    """:func:`case_geometry` of the image file ``path``; ``img``: the file as :func:`open_nifti` opened it already
    (a check that reads its voxels too), so that its header is not read again."""
    try:
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
    except OSError:
        key = (path, -1, -1)  # open_nifti says what is wrong
    found = _GEOMETRY.get(key)
    if found is None:
        img = img if img is not None else open_nifti(path)
        found = image_shape(path, img.shape), header_spacing(path, img)
        if len(_GEOMETRY) >= _GEOMETRY_LIMIT:
            del _GEOMETRY[next(iter(_GEOMETRY))]  # the oldest
        _GEOMETRY[key] = found
    return found


def median_spacing(spacings) -> tuple[float, float, float]:
    """The per-axis median of the cases' spacings ``(x, y, z)``."""
    return tuple(float(v) for v in np.median(np.asarray(spacings, dtype=np.float64), axis=0))  # type: ignore[return-value]


def resampled_shape(shape, spacing, target) -> tuple[int, int, int]:
    """The grid ``(X, Y, Z)`` of a volume of ``shape`` and ``spacing`` resampled to ``target`` spacing."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape[:3], spacing, target))  # type: ignore[return-value]


def model_shape(xyz) -> tuple[int, int, int]:
    """A source-ordered ``(X, Y, Z)`` shape in the model's order ``(D, H, W) = (Z, X, Y)``."""
    return int(xyz[2]), int(xyz[0]), int(xyz[1])


def auto_patch(shapes, budget_voxels: int) -> tuple[int, int, int]:
    """The patch ``(D, H, W)``: the median resampled shape, each side rounded down to a multiple of
    :data:`PATCH_MULTIPLE` (at least one), the largest side shrunk by that step while the patch holds more
    than ``budget_voxels`` voxels."""
    median = np.median(np.asarray(shapes, dtype=np.float64), axis=0)
    patch = [max(PATCH_MULTIPLE, int(s // PATCH_MULTIPLE) * PATCH_MULTIPLE) for s in median]
    while int(np.prod(patch)) > budget_voxels and max(patch) > PATCH_MULTIPLE:
        patch[int(np.argmax(patch))] -= PATCH_MULTIPLE
    return tuple(patch)  # type: ignore[return-value]


def parse_patch(text: str, where=None) -> tuple[int, int, int] | None:
    """``"auto"`` (None) or ``"D,H,W"`` voxels."""
    return _triple(text, "auto", int, "patch_size", "voxel counts D,H,W", "32,64,64", where)


def target_spacing(cases: list[Case], spacing: str, where=None, geometry=None) -> tuple[float, float, float]:
    """The spacing ``(x, y, z)`` the cases are resampled to: ``spacing`` in mm, or the median of theirs
    (``geometry``: the cases' :func:`case_geometry`, where read already)."""
    given = parse_spacing(spacing, where)
    if given is not None:
        return given
    return median_spacing([g[1] for g in (geometry if geometry is not None else map(case_geometry, cases))])


def patch_of(cases: list[Case], patch_size: str, spacing: str, budget_voxels: int, where=None) -> tuple[int, int, int]:
    """The patch ``(D, H, W)``: ``patch_size``, or :func:`auto_patch` of the cases' resampled shapes."""
    given = parse_patch(patch_size, where)
    if given is not None:
        return given
    parse_spacing(spacing, where)  # a bad spacing is said before any header is read
    geometry = [case_geometry(c) for c in cases]  # each header read once
    target = target_spacing(cases, spacing, where, geometry)
    shapes = [model_shape(resampled_shape(shape, case_spacing, target)) for shape, case_spacing in geometry]
    return auto_patch(shapes, budget_voxels)
