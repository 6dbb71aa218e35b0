"""Minibatches read whole (data/batches.py): the same batches as a per-sample DataLoader, in workers too,
augmented on the device exactly as item by item."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from autocnnp.data.augment import RandomAffine2D
from autocnnp.data.batches import DeviceBatches, batch_loader
from autocnnp.data.preprocess import CacheDataset, build_cache
from autocnnp.data.synth import write_synthetic_dataset
from autocnnp.data.synthetic_slices import SyntheticSliceDataset


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batches")
    root = write_synthetic_dataset(folder / "brain", "brain", cases=3, shape=(24, 20, 10), seed=1, test_cases=0)
    return build_cache(root, folder / "cache", normalise=True, n_slices=6, size=16, mode="even")


def per_sample(dataset, sampler, batch_size):
    """What the trainer read before: torch's DataLoader, one sample at a time, collated."""
    return list(DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_cache_batches_equal_the_per_sample_loader(cache, workers):
    ds = CacheDataset(cache, indices=np.arange(2, 18), in_memory=False)
    order = list(np.random.default_rng(0).permutation(len(ds)))
    batches = list(batch_loader(ds, order, 4, drop_last=True, workers=workers))
    reference = per_sample(ds, order, 4)
    assert len(batches) == len(reference) == 4
    for k, ((images, labels, indices), (x, y)) in enumerate(zip(batches, reference)):
        assert images.dtype in (torch.float16, torch.float32) and labels.dtype == torch.uint8
        assert torch.equal(images.float(), x) and torch.equal(labels.long(), y)
        assert indices.tolist() == order[4 * k:4 * k + 4]


def test_views_and_plain_datasets_are_batched_too():
    full = SyntheticSliceDataset("atrium", n=10, size=16, in_channels=1, num_classes=2, seed=0, in_memory=True)
    view = Subset(full, range(4, 10))  # the synthetic format's validation part: read through its parent
    (images, labels, indices), = list(batch_loader(view, [5, 0, 2], 3, drop_last=False))
    assert indices.tolist() == [5, 0, 2] and torch.equal(images[0], full[9][0]) and torch.equal(labels[2], full[6][1])
    plain = TensorDataset(torch.arange(12.0).reshape(6, 1, 2, 1), torch.arange(12).reshape(6, 2, 1))
    (x, y, _), _ = list(batch_loader(plain, range(6), 3, drop_last=True))
    assert torch.equal(x, torch.arange(6.0).reshape(3, 1, 2, 1)) and torch.equal(y[2], plain[2][1])


def test_device_batches_augment_each_item_as_alone_with_the_epoch(cache):
    ds = CacheDataset(cache, in_memory=False)
    affine = RandomAffine2D(translate=0.1, seed=5, flips=True, intensity=0.1)
    loader = DeviceBatches(batch_loader(ds, [7, 3, 11, 0], 2, drop_last=True), torch.device("cpu"), affine,
                           channels_last=True)
    loader.set_epoch(3)
    (x0, y0), (x1, y1) = list(loader)
    assert x0.dtype == torch.float32 and y0.dtype == torch.int64 and x0.is_contiguous(memory_format=torch.channels_last)
    for k, i in enumerate([7, 3]):
        image, label = affine(*ds[i], epoch=3, index=i)
        assert torch.equal(x0[k], image) and torch.equal(y0[k], label)
    loader.set_epoch(4)
    assert not torch.equal(next(iter(loader))[0], x0)
    assert set(torch.unique(y1).tolist()) <= set(torch.unique(torch.from_numpy(np.load(cache / "labels.npy"))).tolist())


def test_flips_and_intensity_leave_the_affine_draws_alone():
    plain, more = RandomAffine2D(seed=2), RandomAffine2D(seed=2, flips=True, intensity=0.2)
    assert plain.params(epoch=1, index=9, size=(64, 64)) == more.params(epoch=1, index=9, size=(64, 64))
    label = torch.zeros(1, 16, 16, dtype=torch.int64)
    label[0, 4:8, 2:5] = 1  # an off-centre block: a flip moves it
    still = RandomAffine2D(rotation=0, zoom=(1, 1), translate=0, flips=True)
    moved = {tuple(still.batch(label[:, None].float(), label, epoch=0, indices=[i])[1][0].nonzero()[0].tolist())
             for i in range(16)}
    assert len(moved) == 4  # no flip, x, y, both: each drawn within 16 items
