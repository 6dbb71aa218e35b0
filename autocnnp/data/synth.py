"""Small, seeded, Decathlon-style NIfTI datasets for tests and demos (no downloads).

:func:`write_synthetic_dataset` writes the Medical Segmentation Decathlon layout::

    out_dir/dataset.json
    out_dir/imagesTr/case_000.nii.gz   out_dir/labelsTr/case_000.nii.gz   ...
    out_dir/imagesTs/case_006.nii.gz   out_dir/labelsTs/case_006.nii.gz (held-out labels, for evaluate)

Two kinds mimic the two use cases of the thesis:

``"brain"`` (like Task01_BrainTumour / BraTS)
    4D images ``(X, Y, Z, 4)`` with modalities FLAIR, T1w, t1gd, T2w; labels 0 background,
    1 edema, 2 non-enhancing tumour, 3 enhancing tumour as nested ellipsoids (edema contains the
    enhancing rim, which contains the non-enhancing core) inside a skull-stripped "head" ellipsoid.
    Voxels outside the head are exactly 0, as in BraTS. Every region has its own contrast per
    modality, plus Gaussian noise.
``"atrium"`` (like Task02_Heart / LASC 2013)
    3D mono-modal images; label 1 is a thin hollow ellipsoid shell (the atrial wall) around a
    bright blood pool, on a noisy non-zero background.

A third kind has structure that single slices cannot resolve (for 3D against 2D):

``"tubes"``
    3D mono-modal images of anisotropic spacing (1 x 1 x 3 mm) holding look-alike blobs of one
    intensity: label 1 spheres and label 2 tubes along z of the same radius, so every axial slice
    through either shows a disc of about the same size; only the extent along z tells them apart.

Everything is deterministic given ``seed``: case ``i`` is drawn from
``numpy.random.default_rng([seed, i])``, so it does not depend on how many cases are written.
Images get a non-identity affine (1 x 1 x 1.5 mm spacing and an offset) so affine handling is
exercised. This module does not import torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

KINDS: tuple[str, ...] = ("brain", "atrium", "tubes")

SPACING = (1.0, 1.0, 1.5)

BRAIN_MODALITIES = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
BRAIN_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
ATRIUM_MODALITIES = {"0": "MRI"}
ATRIUM_LABELS = {"0": "background", "1": "left atrium"}
TUBES_MODALITIES = {"0": "MRI"}
TUBES_LABELS = {"0": "background", "1": "sphere", "2": "tube"}
TUBES_SPACING = (1.0, 1.0, 3.0)  # mm: thick slices, as prostate or cardiac MRI

# Mean intensity of [brain tissue, edema, non-enhancing core, enhancing rim] per modality
# (rows FLAIR, T1w, t1gd, T2w), loosely following how the tissues look in BraTS.
_BRAIN_CONTRAST = np.array(
    [
        [0.50, 1.00, 0.75, 0.85],  # FLAIR: edema bright
        [0.60, 0.45, 0.30, 0.50],  # T1w: tumour dark
        [0.60, 0.50, 0.30, 1.20],  # t1gd: enhancing rim bright
        [0.45, 1.05, 0.95, 0.80],  # T2w: edema and core bright
    ],
    dtype=np.float64,
)
_SCALE = 1000.0
_NOISE = 0.04


def affine_for(shape, spacing=SPACING) -> np.ndarray:
    """The affine written for a volume of ``shape``: diagonal ``spacing`` and a centring offset."""
    affine = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
    affine[:3, 3] = [-(shape[i] - 1) * spacing[i] / 2.0 + (3.5, -2.25, 7.0)[i] for i in range(3)]
    return affine


def _grid(shape):
    return np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")


def _ellipsoid(grid, centre, radii) -> np.ndarray:
    """Squared normalised distance; ``< 1`` inside the ellipsoid."""
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))


def _check_shape(shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 6:
        raise ValueError(f"shape must be three sizes of at least 6 voxels, got {shape}")
    return shape


def brain_case(shape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic brain-tumour case: float32 image ``(X, Y, Z, 4)`` and uint8 label ``(X, Y, Z)``."""
    shape = _check_shape(shape)
    grid = _grid(shape)
    dims = np.array(shape, dtype=np.float64)
    head_centre = (dims - 1) / 2.0
    head = _ellipsoid(grid, head_centre, dims * 0.47) < 1.0

    # Tumour centre on an integer voxel near the middle so every label is present even at 6^3.
    jitter = np.floor(dims * 0.12).astype(int)
    centre = np.array(
        [int(round(head_centre[i])) + int(rng.integers(-jitter[i], jitter[i] + 1)) for i in range(3)],
        dtype=np.float64,
    )
    r_edema = np.maximum(dims * rng.uniform(0.22, 0.30, size=3), 2.5)
    r_rim = r_edema * rng.uniform(0.58, 0.66)
    r_core = np.maximum(r_rim * rng.uniform(0.45, 0.55), 0.75)

    label = np.zeros(shape, dtype=np.uint8)
    label[(_ellipsoid(grid, centre, r_edema) < 1.0) & head] = 1
    label[(_ellipsoid(grid, centre, r_rim) < 1.0) & head] = 3
    label[(_ellipsoid(grid, centre, r_core) < 1.0) & head] = 2

    # Per-case contrast jitter so cases differ, region index: 0 brain, 1 edema, 2 core, 3 rim.
    region = np.select([label == 1, label == 2, label == 3], [1, 2, 3], 0)
    contrast = _BRAIN_CONTRAST * rng.uniform(0.9, 1.1, size=(4, 1))
    image = np.zeros(shape + (4,), dtype=np.float32)
    for m in range(4):
        vol = contrast[m][region] * (1.0 + _NOISE * rng.standard_normal(shape))
        vol = np.clip(vol, 0.02, None) * _SCALE
        image[..., m] = np.where(head, vol, 0.0)
    return image, label


def atrium_case(shape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic left-atrium case: float32 image ``(X, Y, Z)`` and uint8 label ``(X, Y, Z)``."""
    shape = _check_shape(shape)
    grid = _grid(shape)
    dims = np.array(shape, dtype=np.float64)
    mid = (dims - 1) / 2.0
    jitter = np.floor(dims * 0.1).astype(int)
    centre = np.array(
        [int(round(mid[i])) + int(rng.integers(-jitter[i], jitter[i] + 1)) for i in range(3)],
        dtype=np.float64,
    )
    r_out = np.maximum(dims * rng.uniform(0.18, 0.26, size=3), 2.5)
    thickness = rng.uniform(1.1, 1.4)
    r_in = np.maximum(r_out - thickness, 0.6)
    outer = _ellipsoid(grid, centre, r_out) < 1.0
    inner = _ellipsoid(grid, centre, r_in) < 1.0
    label = (outer & ~inner).astype(np.uint8)

    mean = np.full(shape, 0.30)
    mean[inner] = 1.00  # blood pool
    mean[label == 1] = 0.60  # wall
    vol = mean * rng.uniform(0.9, 1.1) * (1.0 + 2 * _NOISE * rng.standard_normal(shape))
    image = (np.clip(vol, 0.02, None) * _SCALE).astype(np.float32)
    return image, label


def tubes_case(shape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One case of spheres (label 1) and tubes along z (label 2) of one radius and intensity, on
    :data:`TUBES_SPACING`: float32 image ``(X, Y, Z)`` and uint8 label ``(X, Y, Z)``."""
    shape = _check_shape(shape)
    grid = _grid(shape)
    sx, _, sz = TUBES_SPACING
    radius = max(2.0, min(shape[0], shape[1]) * 0.12)  # voxels in-plane (mm / sx)
    label = np.zeros(shape, dtype=np.uint8)
    for value in (1, 2, 1, 2):
        centre = [rng.uniform(radius, n - 1 - radius) for n in shape[:2]] + [rng.uniform(0, shape[2] - 1)]
        disc = ((grid[0] - centre[0]) ** 2 + (grid[1] - centre[1]) ** 2) < radius ** 2
        if value == 1:  # a sphere: the disc shrinks away from its centre slice
            inside = _ellipsoid(grid, centre, (radius, radius, radius * sx / sz)) < 1.0
        else:  # a tube through every slice
            inside = disc
        label[inside & (label == 0)] = value
    vol = np.where(label > 0, 1.0, 0.3) * (1.0 + 2 * _NOISE * rng.standard_normal(shape))
    return (np.clip(vol, 0.02, None) * _SCALE).astype(np.float32), label


_GENERATORS = {"brain": brain_case, "atrium": atrium_case, "tubes": tubes_case}
_INDEX = {"brain": ("SyntheticBrainTumour", "4D", BRAIN_MODALITIES, BRAIN_LABELS),
          "atrium": ("SyntheticLeftAtrium", "3D", ATRIUM_MODALITIES, ATRIUM_LABELS),
          "tubes": ("SyntheticTubes", "3D", TUBES_MODALITIES, TUBES_LABELS)}


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def write_synthetic_dataset(
    out_dir,
    kind: str = "brain",
    cases: int = 6,
    shape=(32, 32, 16),
    seed: int = 0,
    test_cases: int = 1,
    affine=None,
) -> Path:
    """Write a seeded Decathlon-layout dataset of ``cases`` labelled and ``test_cases`` test cases.

    Returns ``out_dir`` as a :class:`~pathlib.Path`. Training cases are ``case_000`` ...
    ``case_{cases-1}``; test cases continue the numbering, their labels go to ``labelsTs/`` (not
    listed in dataset.json, as in the Decathlon). ``affine`` (4x4) replaces :func:`affine_for` (of
    :data:`TUBES_SPACING` for ``"tubes"``), e.g. an oblique one. Existing files of the same names are overwritten.
    """
    if kind not in _GENERATORS:
        raise ValueError(f"unknown synthetic dataset kind {kind!r}; choose one of {', '.join(KINDS)}")
    if int(cases) < 0 or int(test_cases) < 0:
        raise ValueError("cases and test_cases must be >= 0")
    shape = _check_shape(shape)
    out = Path(out_dir)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    make = _GENERATORS[kind]
    spacing = TUBES_SPACING if kind == "tubes" else SPACING
    affine = affine_for(shape, spacing) if affine is None else np.asarray(affine, dtype=np.float64)

    training, test = [], []
    for i in range(int(cases) + int(test_cases)):
        image, label = make(shape, np.random.default_rng([int(seed), i]))
        name = f"case_{i:03d}.nii.gz"
        if i < int(cases):
            _save(image, affine, out / "imagesTr" / name)
            _save(label, affine, out / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            _save(image, affine, out / "imagesTs" / name)
            _save(label, affine, out / "labelsTs" / name)
            test.append(f"./imagesTs/{name}")

    name, tensor, modalities, labels = _INDEX[kind]
    index = {
        "name": name,
        "description": f"Synthetic {kind} dataset written by autocnnp (seed {int(seed)})",
        "reference": "autocnnp.data.synth",
        "licence": "CC0",
        "release": "1.0",
        "tensorImageSize": tensor,
        "modality": dict(modalities),
        "labels": dict(labels),
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    (out / "dataset.json").write_text(json.dumps(index, indent=4) + "\n")
    return out
