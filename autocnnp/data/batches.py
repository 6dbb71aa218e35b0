"""Minibatches read whole, not sample by sample, and put on the training device ahead of the step.

A dataset that subclasses :class:`BatchDataset` reads a minibatch with one call (``read_batch``: one
fancy-indexed read of the memory-mapped cache, no per-sample Python and no per-sample collate). The
DataLoader then moves lists of indices (a ``BatchSampler`` over the strategy's sampler) instead of
samples: worker processes, pinned memory and prefetching stay torch's own. Any other map-style dataset
still works; its samples are stacked.

:class:`DeviceBatches` puts each batch on the device (images as float32, labels as int64: the cache's
float16 / uint8 travel), applies the data format's batch augmentation there (affine grids on the GPU
when training runs on one), and, on CUDA, copies the next batch on a side stream while the current step
computes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Subset


class BatchDataset(Dataset):
    """A dataset of ``(image [C, H, W], label [H, W])`` that reads whole minibatches (``read_batch``)."""

    def read_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` (in that order): images ``[B, C, H, W]`` (float16 or float32) and labels
        ``[B, H, W]`` (an integer dtype)."""
        raise NotImplementedError

    def __getitem__(self, index):
        n = len(self)
        i = int(index) + (n if int(index) < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} items")
        images, labels = self.read_batch(np.array([i]))
        return images[0].float(), labels[0].long()


class EpochIndices:
    """The items of ``sampler`` (a dataset of ``size`` items) as ``epoch * size + item``: a dataset that draws its
    items afresh each epoch (random patches; its ``epoch_indexed`` is true) reads the epoch from the index, in any
    worker process. ``set_epoch`` is passed on to ``sampler``."""

    def __init__(self, sampler, size: int):
        self.sampler, self.size, self.epoch = sampler, int(size), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        return (self.epoch * self.size + int(i) for i in self.sampler)


class BatchReader(Dataset):
    """Item ``[i, j, ...]`` is the minibatch ``(images, labels, indices)`` of those items of ``dataset``."""

    def __init__(self, dataset):
        self.dataset, self.positions = dataset, None
        if isinstance(dataset, Subset) and isinstance(dataset.dataset, BatchDataset):  # a view of a batch dataset
            self.dataset, self.positions = dataset.dataset, np.asarray(dataset.indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.dataset) if self.positions is None else len(self.positions)

    def __getitem__(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        if isinstance(self.dataset, BatchDataset):
            images, labels = self.dataset.read_batch(idx if self.positions is None else self.positions[idx])
        else:
            images, labels = (torch.stack(items) for items in zip(*(self.dataset[int(i)] for i in idx)))
        return images, labels, torch.from_numpy(idx)


def batch_loader(dataset, sampler, batch_size: int, *, drop_last: bool, workers: int = 0, pin_memory: bool = False,
                 generator: torch.Generator | None = None, worker_init_fn=None) -> DataLoader:
    """A DataLoader of ``(images, labels, indices)`` minibatches of ``sampler``'s order, each read in one go
    (``workers`` processes read ahead; ``len()`` is the number of batches)."""
    return DataLoader(BatchReader(dataset), batch_size=None, sampler=BatchSampler(sampler, batch_size, drop_last),
                      num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None, generator=generator, worker_init_fn=worker_init_fn)


class Augment(Protocol):
    """A seeded batch augmentation (e.g. :class:`~autocnnp.data.augment.RandomAffine2D`); its repr describes it
    in the manifest."""

    def batch(self, images: torch.Tensor, labels: torch.Tensor, *, epoch: int, indices) -> tuple:
        """``(images, labels)`` transformed on their device, item ``k`` as item ``indices[k]`` of ``epoch`` (the
        draws depend on (epoch, index) only: reproducible)."""


def channels_last(dims: int) -> torch.memory_format:
    """The channels-last memory format of a tensor (or a network's weights) with ``dims`` dimensions: 4 (2D
    images, convolutions) or 5 (3D: channels_last_3d)."""
    return torch.channels_last_3d if dims == 5 else torch.channels_last


def channels_last_network(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` with its weights channels-last (channels_last_3d for a 3D network)."""
    return net.to(memory_format=channels_last(max((p.dim() for p in net.parameters()), default=4)))


class DeviceBatches:
    """The batches of ``loader`` on ``device`` (float32 images, int64 labels), augmented there by ``augment``
    with the epoch of :meth:`set_epoch`, channels-last if asked; on CUDA the next batch is copied on a side
    stream while the current one is used."""

    def __init__(self, loader: DataLoader, device: torch.device, augment: Augment | None, channels_last: bool):
        self.loader, self.device, self.augment, self.channels_last = loader, device, augment, channels_last
        self.epoch = 0
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _copy(self, batch):
        images, labels, indices = batch
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), indices

    def _ready(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor):
        images, labels = images.float(), labels.long()
        if self.augment is not None:
            images, labels = self.augment.batch(images, labels, epoch=self.epoch, indices=indices)
        if self.channels_last:
            images = images.contiguous(memory_format=channels_last(images.dim()))
        return images, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._stream is None:
            for batch in self.loader:
                yield self._ready(*self._copy(batch))
            return
        current, pending = torch.cuda.current_stream(self.device), None
        for batch in self.loader:
            with torch.cuda.stream(self._stream):  # this copy runs while the step of the pending batch computes
                copied, done = self._copy(batch), torch.cuda.Event()
                done.record(self._stream)
            if pending is not None:
                yield self._on(current, *pending)
            pending = copied, done
        if pending is not None:
            yield self._on(current, *pending)

    def _on(self, current, copied, done):
        """A batch copied on the side stream, handed to the compute stream."""
        current.wait_event(done)
        for t in copied[:2]:
            t.record_stream(current)  # its memory is the compute stream's from now on
        return self._ready(*copied)
