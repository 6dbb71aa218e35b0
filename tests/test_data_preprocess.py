"""ImgMed pre-processing, the slice cache, augmentation and the synthetic slice dataset."""

import fcntl
import io
import json
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autocnnp.core.errors import DataError
from autocnnp.data import preprocess
from autocnnp.data.augment import RandomAffine2D
from autocnnp.data.index import read_dataset
from autocnnp.data.preprocess import CacheDataset, build_cache, check_cache, read_cache_meta
from autocnnp.data.slices import extract_slices, resize, select_modalities, slice_indices, zscore
from autocnnp.data.synth import write_synthetic_dataset
from autocnnp.data.synthetic_slices import SyntheticSliceDataset

SHAPE = (24, 24, 8)


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("brain"), "brain", cases=3, shape=SHAPE, seed=2)


# ---------------------------------------------------------------- slice selection

def test_even_slices():
    assert slice_indices(10, 5).tolist() == [0, 2, 5, 7, 9]
    assert slice_indices(10, 20).tolist() == list(range(10))
    assert slice_indices(10, None).tolist() == list(range(10))
    assert slice_indices(10, 1).tolist() == [4]
    for depth in range(1, 40):
        for n in range(1, depth + 1):
            idx = slice_indices(depth, n)
            assert len(idx) == n and len(set(idx.tolist())) == n
            assert (np.diff(idx) > 0).all() and idx.min() >= 0 and idx.max() < depth
            if n > 1:
                assert idx[0] == 0 and idx[-1] == depth - 1


def test_labelled_slices():
    label = np.zeros((6, 6, 20), np.uint8)
    label[2:4, 2:4, 5:13] = 1
    idx = slice_indices(20, 4, "labelled", label=label)
    assert idx.tolist() == [5, 7, 10, 12]
    assert slice_indices(20, 50, "labelled", label=label).tolist() == list(range(5, 13))
    # along another axis
    assert slice_indices(6, 2, "labelled", label=label, axis=0).tolist() == [2, 3]
    # empty label: falls back to the whole volume
    assert slice_indices(20, 3, "labelled", label=np.zeros_like(label)).tolist() == [0, 10, 19]
    with pytest.raises(ValueError):
        slice_indices(20, 3, "labelled")
    with pytest.raises(ValueError):
        slice_indices(20, 3, "random")


def test_extract_slices_layout():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((5, 6, 7, 3)).astype(np.float32)
    label = rng.integers(0, 3, (5, 6, 7))
    idx, imgs, labs = extract_slices(image, label, 3)
    assert idx.tolist() == [0, 3, 6]
    assert imgs.shape == (3, 3, 5, 6) and labs.shape == (3, 5, 6)
    np.testing.assert_array_equal(imgs[1, 2], image[:, :, 3, 2])
    np.testing.assert_array_equal(labs[2], label[:, :, 6])
    idx, imgs, labs = extract_slices(image[..., 0], None, 2, axis=0)
    assert imgs.shape == (2, 1, 6, 7) and labs is None


def test_select_modalities():
    image = np.arange(2 * 2 * 2 * 4).reshape(2, 2, 2, 4)
    out = select_modalities(image, [1, 3])
    np.testing.assert_array_equal(out, image[..., [1, 3]])
    assert select_modalities(image, None) is image
    with pytest.raises(ValueError):
        select_modalities(image, [4])


def test_resize_keeps_label_values_and_shapes():
    rng = np.random.default_rng(1)
    label = rng.choice([0, 1, 3], size=(17, 23)).astype(np.uint8)
    for size in [(32, 40), 8, (17, 23), (5, 50)]:
        out = resize(label, size, label=True)
        want = (size, size) if isinstance(size, int) else size
        assert out.shape == want and out.dtype == np.uint8
        assert set(np.unique(out)) <= {0, 1, 3}
    image = rng.standard_normal((2, 17, 23)).astype(np.float32)
    out = resize(image, (34, 46))
    assert out.shape == (2, 34, 46) and out.dtype == np.float32
    assert out.min() >= image.min() - 1e-5 and out.max() <= image.max() + 1e-5
    np.testing.assert_allclose(resize(np.full((3, 9, 9), 2.5, np.float32), 20), 2.5, rtol=1e-6)
    assert resize(np.zeros((4, 3, 9, 9)), 5).shape == (4, 3, 5, 5)


def test_zscore_over_nonzero_voxels():
    rng = np.random.default_rng(2)
    image = np.zeros((10, 10, 4, 2), np.float32)
    image[2:8, 2:8, :, 0] = rng.normal(300, 40, (6, 6, 4))
    image[..., 1] = rng.normal(5, 2, (10, 10, 4))
    out = zscore(image)
    inside = image[..., 0] != 0
    assert (out[~inside, 0] == 0).all()
    assert abs(out[inside, 0].mean()) < 1e-4 and abs(out[inside, 0].std() - 1) < 1e-3
    assert abs(out[..., 1].mean()) < 1e-4
    assert out.dtype == np.float32 and image[3, 3, 0, 0] != out[3, 3, 0, 0]  # input untouched


# ---------------------------------------------------------------- the cache

def test_build_cache_contents(brain, tmp_path):
    cache = build_cache(brain, tmp_path / "c", normalise=True, n_slices=4, size=(16, 12), modalities=["T1w", 0], mode="labelled")
    meta = read_cache_meta(cache)
    images = np.load(cache / "images.npy")
    labels = np.load(cache / "labels.npy")
    assert images.shape == (12, 2, 16, 12) and images.dtype == np.float16  # z-scored: float16 (module docstring)
    assert meta["dtype"] == {"images": "float16", "labels": "uint8"} and meta["format"] == 2
    assert labels.shape == (12, 16, 12) and labels.dtype == np.uint8
    assert meta["count"] == 12 and meta["channels"] == 2 and meta["modalities"] == [1, 0]
    assert meta["modality_names"] == ["T1w", "FLAIR"]
    assert [c["name"] for c in meta["cases"]] == ["case_000", "case_001", "case_002"]
    assert meta["slice_case"] == [0] * 4 + [1] * 4 + [2] * 4
    assert len(meta["slice_index"]) == 12 and all(0 <= z < SHAPE[2] for z in meta["slice_index"])
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and labels.max() > 0
    assert sum(meta["label_counts"]) == labels.size
    assert np.isfinite(images).all() and abs(images.std() - 1) < 0.5
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]


def test_build_cache_is_idempotent_and_keyed(brain, tmp_path):
    kwargs = dict(normalise=True, n_slices=3, size=16, modalities=None, mode="even")
    cache = build_cache(brain, tmp_path / "c", **kwargs)
    stamp = {n: (cache / n).stat().st_mtime_ns for n in ("images.npy", "labels.npy", "meta.json")}
    key = read_cache_meta(cache)["key"]
    assert build_cache(brain, tmp_path / "c", **kwargs) == cache
    assert {n: (cache / n).stat().st_mtime_ns for n in stamp} == stamp
    # other parameters: rebuilt under another key
    build_cache(brain, tmp_path / "c", **dict(kwargs, n_slices=2))
    meta = read_cache_meta(cache)
    assert meta["key"] != key and meta["count"] == 6
    # a touched source file changes the key too
    src = brain / "imagesTr" / "case_001.nii.gz"
    st = src.stat()
    try:
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        build_cache(brain, tmp_path / "c", **dict(kwargs, n_slices=2))
        assert read_cache_meta(cache)["key"] != meta["key"]
    finally:
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_build_cache_case_indices_and_errors(brain, tmp_path):
    cache = build_cache(brain, tmp_path / "c", normalise=True, n_slices=2, size=8, case_indices=[2, 0])
    assert [c["name"] for c in read_cache_meta(cache)["cases"]] == ["case_002", "case_000"]
    with pytest.raises(DataError, match="out of range"):
        build_cache(brain, tmp_path / "d", normalise=True, n_slices=2, size=8, case_indices=[3])
    with pytest.raises(DataError, match="not declared"):
        build_cache(brain, tmp_path / "d", normalise=True, n_slices=2, size=8, modalities=["PET"])
    with pytest.raises(DataError, match="build_cache"):
        CacheDataset(tmp_path / "nothing", in_memory=False)


def _build_in_child(root, cache_dir, barrier, queue):
    barrier.wait()  # start both builds at the same moment
    out = build_cache(root, cache_dir, normalise=True, n_slices=5, size=20, mode="labelled")
    queue.put((os.stat(out / "images.npy").st_ino, read_cache_meta(out)["key"]))


def test_concurrent_builds_give_one_valid_cache(brain, tmp_path):
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(brain, tmp_path / "c", barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]  # same file: the loser reused the winner's build
    ds = CacheDataset(tmp_path / "c", in_memory=False)
    assert len(ds) == 15
    assert np.load(tmp_path / "c" / "images.npy").shape == (15, 4, 20, 20)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [".lock", "images.npy", "labels.npy", "meta.json"]


def test_build_waits_for_the_lock(brain, tmp_path):
    cache = tmp_path / "c"
    cache.mkdir()
    fd = os.open(cache / ".lock", os.O_RDWR | os.O_CREAT)
    ctx = mp.get_context("fork")
    child = ctx.Process(target=build_cache, args=(brain, cache), kwargs=dict(normalise=True, n_slices=2, size=8))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        child.start()
        child.join(timeout=0.7)
        assert child.is_alive() and not (cache / "meta.json").exists()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    child.join(timeout=60)
    assert child.exitcode == 0 and read_cache_meta(cache)["count"] == 6


def test_cache_dataset(brain, tmp_path):
    cache = build_cache(brain, tmp_path / "c", normalise=True, n_slices=3, size=16, modalities=[0, 2])
    ds = CacheDataset(cache, in_memory=False)
    assert len(ds) == 9 and ds.num_channels == 2 and ds.size == (16, 16)
    image, label = ds[4]
    assert image.dtype == torch.float32 and image.shape == (2, 16, 16)
    assert label.dtype == torch.int64 and label.shape == (16, 16)
    np.testing.assert_array_equal(image.numpy(), np.load(cache / "images.npy")[4])
    assert torch.equal(ds[-1][1], ds[8][1])
    with pytest.raises(IndexError):
        ds[9]
    assert isinstance(ds._images, np.memmap)  # memory-mapped, rows read on demand
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._images is None and torch.equal(clone[4][0], image)
    sub = CacheDataset(cache, indices=ds.indices_of_cases(["case_001"]), in_memory=False)
    assert len(sub) == 3 and torch.equal(sub[0][0], ds[3][0])

    images, labels = sub.read_batch(np.array([2, 0]))  # one read, in the order asked, in the cache's dtypes
    assert images.shape == (2, *ds[0][0].shape) and labels.dtype == torch.uint8
    assert torch.equal(images[0].float(), ds[5][0]) and torch.equal(labels[1].long(), ds[3][1])
    with pytest.raises(IndexError):
        sub.read_batch(np.array([3]))


# ---------------------------------------------------------------- augmentation

def _blob(h=32, w=40):
    label = np.zeros((h, w), np.int64)
    label[8:20, 10:22] = 1
    label[12:16, 14:18] = 2
    label[24:28, 30:36] = 3
    return label


def test_augment_same_transform_on_image_and_mask():
    label = torch.from_numpy(_blob())
    image = torch.stack([label.float(), torch.rand(label.shape)])
    for index in range(5):
        nearest = RandomAffine2D(seed=4, translate=0.1, image_mode="nearest")
        img, lab = nearest(image, label, epoch=1, index=index)
        assert torch.equal(img[0], lab.float())
        bilinear = RandomAffine2D(seed=4, translate=0.1)
        img, lab2 = bilinear(image, label, epoch=1, index=index)
        assert torch.equal(lab2, lab) and lab.dtype == torch.int64
        assert (img[0].round() == lab.float()).float().mean() > 0.9
        assert set(lab.unique().tolist()) <= {0, 1, 2, 3}


def test_augment_deterministic_per_seed_epoch_index():
    label = torch.from_numpy(_blob())
    image = torch.rand(1, *label.shape)
    aug = RandomAffine2D(seed=7, translate=0.1)
    a = aug(image, label, epoch=2, index=5)
    b = RandomAffine2D(seed=7, translate=0.1)(image, label, epoch=2, index=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], aug(image, label, epoch=3, index=5)[0])
    assert not torch.equal(a[0], aug(image, label, epoch=2, index=6)[0])
    assert aug.params(epoch=2, index=5, size=(32, 40)) != RandomAffine2D(seed=8).params(epoch=2, index=5, size=(32, 40))


def test_augment_ranges_and_geometry():
    aug = RandomAffine2D()  # thesis Table 2.1 defaults
    assert (aug.rotation, aug.zoom, aug.translate) == (45.0, (0.8, 1.2), 25.6)
    for i in range(50):
        angle, zoom, tx, ty = aug.params(epoch=0, index=i, size=(512, 512))
        assert -45 <= angle <= 45 and 0.8 <= zoom <= 1.2 and abs(tx) <= 25.6 and abs(ty) <= 25.6
    # identity
    still = RandomAffine2D(rotation=0, zoom=(1, 1), translate=0)
    image = torch.rand(2, 12, 15)
    out, _ = still(image, None, epoch=0, index=0)
    torch.testing.assert_close(out, image, atol=1e-5, rtol=0)
    # a pure shift of 3 px along x moves a dot 3 px to the right
    dot = np.zeros((11, 13), np.int64)
    dot[5, 4] = 1
    grid = torch.nn.functional.affine_grid(RandomAffine2D.theta(0, 1, 3, 0, (11, 13))[None], [1, 1, 11, 13],
                                           align_corners=False)
    moved = torch.nn.functional.grid_sample(torch.from_numpy(dot).float()[None, None], grid, mode="nearest",
                                            align_corners=False)[0, 0]
    assert moved[5, 7] == 1 and moved.sum() == 1
    # a 90 degree rotation of a square image is a rot90 (either direction)
    label = torch.from_numpy(_blob(24, 24))
    rot = RandomAffine2D(rotation=0, zoom=(1, 1), translate=0, image_mode="nearest")
    theta = RandomAffine2D.theta(90, 1, 0, 0, (24, 24))
    grid = torch.nn.functional.affine_grid(theta[None], [1, 1, 24, 24], align_corners=False)
    turned = torch.nn.functional.grid_sample(label.float()[None, None], grid, mode="nearest", align_corners=False)[0, 0]
    assert torch.equal(turned, torch.rot90(label.float(), 1)) or torch.equal(turned, torch.rot90(label.float(), -1))
    assert rot(label.float()[None], label, epoch=0, index=0)[1].equal(label)


def test_augment_numpy_in_numpy_out():
    label = _blob().astype(np.uint8)
    image = np.stack([label.astype(np.float32)] * 2)
    img, lab = RandomAffine2D(seed=1, translate=5)(image, label, epoch=0, index=0)
    assert isinstance(img, np.ndarray) and img.dtype == np.float32 and img.shape == image.shape
    assert isinstance(lab, np.ndarray) and lab.dtype == np.uint8 and lab.shape == label.shape


# ---------------------------------------------------------------- synthetic slices

@pytest.mark.parametrize("kind", ["brain", "atrium"])
def test_synthetic_slice_dataset(kind):
    ds = SyntheticSliceDataset(kind, n=6, size=(32, 40), in_channels=3, num_classes=3, seed=1, in_memory=False)
    assert len(ds) == 6
    image, label = ds[2]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 40)
    assert label.dtype == torch.int64 and label.shape == (32, 40)
    assert set(label.unique().tolist()) == {0, 1, 2}
    again = SyntheticSliceDataset(kind, n=6, size=(32, 40), in_channels=3, num_classes=3, seed=1, in_memory=False)[2]
    assert torch.equal(image, again[0]) and torch.equal(label, again[1])
    other = SyntheticSliceDataset(kind, n=6, size=(32, 40), in_channels=3, num_classes=3, seed=2, in_memory=False)[2]
    assert not torch.equal(image, other[0])
    assert not torch.equal(ds[0][1], ds[1][1])
    # classes are separable on channel 0: mean intensity rises with the class
    means = [image[0][label == c].mean().item() for c in range(3)]
    assert means[0] < means[1] < means[2]
    with pytest.raises(IndexError):
        ds[6]


def test_synthetic_slices_read_in_batches_as_item_by_item():
    for in_memory in (False, True):
        ds = SyntheticSliceDataset("brain", n=5, size=16, in_channels=2, num_classes=3, seed=0, in_memory=in_memory)
        images, labels = ds.read_batch(np.array([4, 1, 1]))
        assert images.shape == (3, 2, 16, 16) and labels.shape == (3, 16, 16)
        assert all(torch.equal(images[k], ds[i][0]) and torch.equal(labels[k], ds[i][1]) for k, i in enumerate([4, 1, 1]))


# ---------------------------------------------------------------- mixed slice selection

def _mixed_label(depth=20, labelled=range(5, 9)):
    label = np.zeros((4, 5, depth), np.uint8)
    for z in labelled:
        label[1, 2, z] = 1 + z % 3  # any non-zero class counts
    return label


def _groups(idx, labelled):
    fg = [z for z in idx.tolist() if z in set(labelled)]
    return len(fg), len(idx) - len(fg)


def test_mixed_slices_counts_per_group():
    label = _mixed_label()  # slices 5-8 labelled, 16 background
    idx = slice_indices(20, 6, "mixed", label=label, foreground_fraction=0.5)
    assert idx.dtype == np.int64 and _groups(idx, range(5, 9)) == (3, 3)
    assert idx.tolist() == [0, 5, 7, 8, 12, 19]  # even within each group: fg [5, 7, 8], bg [0, 12, 19]
    assert _groups(slice_indices(20, 8, "mixed", label=label, foreground_fraction=0.25), range(5, 9)) == (2, 6)
    assert _groups(slice_indices(20, 5, "mixed", label=label, foreground_fraction=0.5), range(5, 9)) == (3, 2)  # half up
    # the default fraction is 0.5
    assert slice_indices(20, 6, "mixed", label=label).tolist() == idx.tolist()
    # along another axis: label rows 1 of 4 along axis 0
    assert slice_indices(4, 2, "mixed", label=label, axis=0, foreground_fraction=0.5).tolist() == [1, 2]


def test_mixed_slices_fraction_bounds_and_fill_up():
    labelled = [2, 3, 7, 11, 12, 15]  # not contiguous: "labelled" would take the range 2..15
    label = _mixed_label(labelled=labelled)
    only_fg = slice_indices(20, 3, "mixed", label=label, foreground_fraction=1.0)
    assert only_fg.tolist() == [2, 11, 15]  # evenly among the labelled slices, none between them
    only_bg = slice_indices(20, 4, "mixed", label=label, foreground_fraction=0.0)
    assert _groups(only_bg, labelled) == (0, 4)
    # a group too short: the other fills up, the total stays n
    assert _groups(slice_indices(20, 10, "mixed", label=label, foreground_fraction=1.0), labelled) == (6, 4)
    assert _groups(slice_indices(20, 17, "mixed", label=label, foreground_fraction=0.0), labelled) == (3, 14)
    label = _mixed_label(labelled=range(20))  # every slice labelled
    assert slice_indices(20, 5, "mixed", label=label, foreground_fraction=0.0).tolist() == [0, 5, 10, 14, 19]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="foreground_fraction"):
            slice_indices(20, 5, "mixed", label=label, foreground_fraction=bad)
    with pytest.raises(ValueError, match="label map"):
        slice_indices(20, 5, "mixed")


def test_mixed_slices_all_zero_all_slices_distinct_sorted():
    empty = np.zeros((3, 3, 20), np.uint8)
    assert slice_indices(20, 3, "mixed", label=empty, foreground_fraction=0.7).tolist() == [0, 10, 19]
    label = _mixed_label()
    for n in (None, 0, 20, 50):
        assert slice_indices(20, n, "mixed", label=label).tolist() == list(range(20))
    rng = np.random.default_rng(3)
    for _ in range(200):
        depth = int(rng.integers(1, 30))
        label = (rng.random((2, 2, depth)) < rng.random()).astype(np.uint8)
        n, f = int(rng.integers(1, depth + 3)), float(rng.random())
        idx = slice_indices(depth, n, "mixed", label=label, foreground_fraction=f)
        assert len(idx) == min(n, depth) and (np.diff(idx) > 0).all() and 0 <= idx.min() and idx.max() < depth
        hit = set(np.flatnonzero(label.any(axis=(0, 1))).tolist())
        if hit and n < depth:
            want = min(max(int(np.floor(f * n + 0.5)), n - (depth - len(hit))), len(hit))
            assert _groups(idx, hit)[0] == want


def test_build_cache_mixed_keyed_by_fraction(brain, tmp_path):
    kwargs = dict(normalise=True, n_slices=4, size=16, mode="mixed")
    keys, fg = {}, {}
    for f in (0.0, 1.0, 0.0):
        cache = build_cache(brain, tmp_path / f"c{f}", foreground_fraction=f, **kwargs)
        meta = read_cache_meta(cache)
        assert meta["params"]["foreground_fraction"] == f and meta["count"] == 12
        keys.setdefault(f, meta["key"])
        assert keys[f] == meta["key"]  # same fraction, same key
        fg[f] = (np.load(cache / "labels.npy") > 0).any(axis=(1, 2)).sum()
    assert keys[0.0] != keys[1.0] and fg[1.0] > fg[0.0]
    # the same folder rebuilds for another fraction
    build_cache(brain, tmp_path / "c0.0", foreground_fraction=0.5, **kwargs)
    assert read_cache_meta(tmp_path / "c0.0")["key"] not in keys.values()
    with pytest.raises(ValueError, match="foreground_fraction"):
        build_cache(brain, tmp_path / "d", foreground_fraction=2, **kwargs)


# ---------------------------------------------------------------- fast, parallel, resumable builds

def _reference_cache(root, *, mods, n_slices, size, mode, foreground_fraction, normalise, axis):
    """The cache as the first implementation built it, written plainly: nibabel's get_fdata, a boolean-mask
    z-score in float64 over the whole volume, np.take, one torch resize of every slice, float32."""
    images, labels = [], []
    for case in read_dataset(root).cases("training"):
        image = nib.load(case.image).get_fdata(dtype=np.float32)[..., mods]
        label = np.asanyarray(nib.load(case.label).dataobj).astype(np.int64)
        if normalise:
            for c in range(image.shape[-1]):
                mask = image[..., c] != 0
                values = image[..., c][mask].astype(np.float64)
                std = values.std()
                image[..., c][mask] = ((values - values.mean()) / (std if std > 1e-8 else 1.0)).astype(np.float32)
        idx = slice_indices(image.shape[axis], n_slices, mode, label=label, axis=axis,
                            foreground_fraction=foreground_fraction)
        slices = np.moveaxis(np.moveaxis(np.take(image, idx, axis=axis), axis, 0), -1, 1)
        flat = torch.from_numpy(np.ascontiguousarray(slices).reshape(-1, 1, *slices.shape[-2:]))
        shrink = size[0] < slices.shape[-2] or size[1] < slices.shape[-1]
        resized = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=shrink)
        images.append(resized.numpy().reshape(len(idx), len(mods), *size))
        lab = torch.from_numpy(np.moveaxis(np.take(label, idx, axis=axis), axis, 0).astype(np.float32))[:, None]
        labels.append(F.interpolate(lab, size=size, mode="nearest-exact")[:, 0].numpy().astype(np.uint8))
    return np.concatenate(images), np.concatenate(labels)


@pytest.mark.parametrize("normalise, axis", [(True, 2), (False, 2), (True, 0)])
def test_build_cache_equals_a_plain_reference(brain, tmp_path, normalise, axis):
    kwargs = dict(n_slices=5, size=(20, 12), mode="mixed", foreground_fraction=0.6, normalise=normalise, axis=axis)
    cache = build_cache(brain, tmp_path / "c", modalities=["t1gd", 0], **kwargs)
    images, labels = np.load(cache / "images.npy"), np.load(cache / "labels.npy")
    want_images, want_labels = _reference_cache(brain, mods=[2, 0], **kwargs)
    np.testing.assert_array_equal(labels, want_labels)
    if normalise:  # float16: the float32 result rounded to 11 significant bits
        assert images.dtype == np.float16 and read_cache_meta(cache)["dtype"]["images"] == "float16"
        np.testing.assert_allclose(images.astype(np.float32), want_images, rtol=2**-11 + 1e-6, atol=2**-24)
        assert np.mean(images == want_images.astype(np.float16)) > 0.99  # mostly the very same float16
    else:  # raw intensities stay float32
        assert images.dtype == np.float32 and read_cache_meta(cache)["dtype"]["images"] == "float32"
        np.testing.assert_allclose(images, want_images, rtol=1e-6)


def test_zscore_equals_the_masked_float64_reference():
    rng = np.random.default_rng(5)
    image = np.zeros((12, 10, 6, 4), np.float32)
    image[2:9, 3:8, :, 0] = rng.normal(300, 40, (7, 5, 6))
    image[2:9, 3:8, :, 1] = 7.0  # constant: only centred
    image[1:11, :, 1:5, 2] = 1e4 + rng.normal(0, 0.5, (10, 10, 4))  # std 5e-5 of the mean: the two-pass path
    out = zscore(image)  # channel 3 is all zero
    for c in range(4):
        mask = image[..., c] != 0
        values = image[..., c][mask].astype(np.float64)
        std = values.std() if mask.any() else 1.0
        want = np.zeros(image.shape[:3], np.float32)
        want[mask] = (values - values.mean()) / (std if std > 1e-8 else 1.0) if mask.any() else 0
        np.testing.assert_allclose(out[..., c], want, rtol=1e-6, atol=1e-6)
    assert (out[..., 1] == 0).all() and (out[..., 3] == 0).all()


@pytest.mark.slow
def test_a_data_error_in_a_worker_reaches_the_caller_unchanged(brain, tmp_path):
    bad = shutil.copytree(brain, tmp_path / "bad")
    image = bad / "imagesTr" / "case_001.nii.gz"
    image.write_bytes(image.read_bytes()[:1000])  # the header is readable, the voxels are cut off
    with pytest.raises(DataError) as here:
        build_cache(bad, tmp_path / "c1", normalise=True, n_slices=4, size=16, workers=1)
    with pytest.raises(DataError) as from_worker:
        build_cache(bad, tmp_path / "c2", normalise=True, n_slices=4, size=16, workers=2)
    assert type(from_worker.value) is DataError and str(from_worker.value) == str(here.value)
    assert str(image) in str(here.value) and "truncated" in str(here.value)
    assert not mp.active_children()  # the pool is gone


_BUILD_THEN_HANG = """
import sys, time
from autocnnp.data import preprocess
build_case = preprocess._build_case
def build_then_hang(*args, **kwargs):
    result = build_case(*args, **kwargs)
    time.sleep(600)
    return result
preprocess._build_case = build_then_hang
preprocess.build_cache(sys.argv[1], sys.argv[2], normalise=True, n_slices=4, size=16, mode="mixed", workers=1)
"""


@pytest.mark.slow
def test_a_killed_build_goes_on_where_it_stopped(brain, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    child = subprocess.Popen([sys.executable, "-c", _BUILD_THEN_HANG, str(brain), str(cache)])
    try:
        deadline = time.monotonic() + 60
        while not list(cache.glob(".build-*/done/0.json")) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    assert list(cache.glob(".build-*/done/0.json")) and not (cache / "meta.json").exists()
    built, build_case = [], preprocess._build_case
    monkeypatch.setattr(preprocess, "_build_case", lambda position, *a, **k: built.append(position) or
                        build_case(position, *a, **k))
    build_cache(brain, cache, normalise=True, n_slices=4, size=16, mode="mixed", workers=1)
    assert built == [1, 2]  # case 0 was finished before the kill
    whole = build_cache(brain, tmp_path / "whole", normalise=True, n_slices=4, size=16, mode="mixed", workers=1)
    for name in ("images.npy", "labels.npy", "meta.json"):
        assert (cache / name).read_bytes() == (whole / name).read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == [".lock", "images.npy", "labels.npy", "meta.json"]


_BUILD_WITH_A_HANGING_CASE = """
import sys, time
from pathlib import Path
from autocnnp.data import preprocess

read_case = preprocess.read_case


def read_case_or_hang(case):  # patched in the workers too: spawn imports this file in them
    if case.name == "case_000":
        (Path(sys.argv[2]).parent / "hanging").touch()
        time.sleep(600)
    return read_case(case)


preprocess.read_case = read_case_or_hang
if __name__ == "__main__":
    preprocess.build_cache(sys.argv[1], sys.argv[2], normalise=True, n_slices=4, size=16, mode="mixed", workers=2)
"""


def _session(sid: int) -> list[int]:
    """The live processes of session ``sid``."""
    pids = []
    for stat in os.listdir("/proc"):
        try:
            fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat))
    return pids


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_and_the_build_goes_on_after(brain, tmp_path, monkeypatch):
    script, cache = tmp_path / "build.py", tmp_path / "c"
    script.write_text(_BUILD_WITH_A_HANGING_CASE)
    child = subprocess.Popen([sys.executable, str(script), str(brain), str(cache)], start_new_session=True,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not ((tmp_path / "hanging").exists() and len(list(cache.glob(".build-*/done/*.json"))) == 2):
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert len(_session(child.pid)) >= 3  # the parent and its two workers (one hanging, one idle)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
        deadline = time.monotonic() + 20
        while _session(child.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert child.returncode != 0 and b"KeyboardInterrupt" in err
        assert _session(child.pid) == []  # no worker outlived it
    finally:
        for pid in _session(child.pid):
            os.kill(pid, signal.SIGKILL)
    built, build_case = [], preprocess._build_case
    monkeypatch.setattr(preprocess, "_build_case", lambda position, *a, **k: built.append(position) or
                        build_case(position, *a, **k))
    build_cache(brain, cache, normalise=True, n_slices=4, size=16, mode="mixed", workers=1)
    assert built == [0]  # the workers had finished cases 1 and 2
    whole = build_cache(brain, tmp_path / "whole", normalise=True, n_slices=4, size=16, mode="mixed", workers=1)
    for name in ("images.npy", "labels.npy", "meta.json"):  # what the workers wrote equals a build in one process
        assert (cache / name).read_bytes() == (whole / name).read_bytes()


def test_progress_lines(brain, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preprocess._Progress, "QUIET_S", 0.0)
    build_cache(brain, tmp_path / "c", normalise=True, n_slices=2, size=8, progress=True, workers=1)
    lines = capsys.readouterr().err.splitlines()  # not a terminal: a line at each quarter of the cases
    assert [line.split(",")[0] for line in lines] == [f"preprocess: {i}/3 cases" for i in (1, 2, 3)]
    assert "slices/s" in lines[0] and "ETA" in lines[0] and "done in" in lines[-1]
    meter = preprocess._Progress(5000, 0)
    for _ in range(5000):
        meter.case_done(70)
    assert len(capsys.readouterr().err.splitlines()) == 4  # thousands of cases: still a few lines

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    meter = preprocess._Progress(3, 1)  # resumed: one case done before
    for _ in range(2):
        meter.case_done(70)
    text = sys.stderr.getvalue()
    assert text.startswith("preprocess: resuming, 1 of 3 case(s) done before\n")
    assert text.count("\r") == 2 and text.endswith("\n") and "3/3 cases" in text


def test_format_1_caches_are_read_and_rebuilt(brain, tmp_path):
    cache = build_cache(brain, tmp_path / "c", normalise=True, n_slices=2, size=8)
    old = dict(read_cache_meta(cache), format=1, key="of format 1", dtype={"images": "float32", "labels": "uint8"})
    np.save(cache / "images.npy", np.load(cache / "images.npy").astype(np.float32))
    (cache / "meta.json").write_text(json.dumps(old))
    assert read_cache_meta(cache)["format"] == 1 and not check_cache(cache).problems
    build_cache(brain, cache, normalise=True, n_slices=2, size=8)
    assert read_cache_meta(cache)["format"] == 2 and np.load(cache / "images.npy").dtype == np.float16


def test_preprocess_command_shows_progress(brain, tmp_path, cli, monkeypatch):
    monkeypatch.setattr(preprocess._Progress, "QUIET_S", 0.0)
    rc, out, err = cli("preprocess", brain, tmp_path / "c", "--slices", 2, "--size", 8, "--workers", 1)
    assert rc == 0 and "6 slices" in out and "preprocess: 3/3 cases" in err

