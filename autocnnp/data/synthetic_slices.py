"""Seeded synthetic 2D slices generated in memory (``<data format="synthetic">``, the demo and tests)."""

from __future__ import annotations

import numpy as np
import torch

from .batches import BatchDataset
from .synth import KINDS


class SyntheticSliceDataset(BatchDataset):
    """A seeded 2D dataset of noisy images with nested discs (``kind="brain"``) or concentric thin
    rings (``kind="atrium"``), one shape per class ``1 .. num_classes-1``.

    ``dataset[i]`` is ``(image, label)``: a float32 tensor ``[in_channels, H, W]`` and an int64
    tensor ``[H, W]`` -- the same types as :class:`~autocnnp.data.preprocess.CacheDataset`. Item
    ``i`` is generated on demand from ``numpy.random.default_rng([seed, i])``, so it is identical
    on every rank, in every worker and on every call (``in_memory`` generates them all once, up
    front, into two arrays a minibatch is read from in one go). Every channel shows every class with
    its own contrast, so any ``in_channels`` is learnable.
    """

    def __init__(self, kind: str, n: int, size, in_channels: int, num_classes: int, seed: int, *, in_memory: bool):
        if kind not in KINDS:
            raise ValueError(f"unknown synthetic kind {kind!r}; choose one of {', '.join(KINDS)}")
        if int(n) < 0 or int(in_channels) < 1 or int(num_classes) < 2:
            raise ValueError("need n >= 0, in_channels >= 1 and num_classes >= 2")
        if isinstance(size, (int, np.integer)):
            size = (int(size), int(size))
        self.size = tuple(int(s) for s in size)
        if len(self.size) != 2 or min(self.size) < 8:
            raise ValueError(f"size must be at least 8 x 8, got {size}")
        self.kind = kind
        self.n = int(n)
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        # Per-channel contrast: intensity = gain[c] * class_level + bias[c]; |gain| >= 0.6 keeps
        # every channel informative. Fixed for the dataset (depends on seed only).
        crng = np.random.default_rng([self.seed, 0x5EED])
        self.gain = crng.uniform(0.6, 1.2, size=self.in_channels) * crng.choice([-1.0, 1.0], size=self.in_channels)
        self.gain[0] = abs(self.gain[0])
        self.bias = crng.uniform(-0.2, 0.2, size=self.in_channels)
        self.noise = 0.15
        self._arrays = None  # in_memory: every item generated once, here (later epochs cost no generation at all)
        if in_memory and self.n:
            items = [self.sample(i) for i in range(self.n)]
            self._arrays = np.stack([im for im, _ in items]), np.stack([lab for _, lab in items])

    def __len__(self) -> int:
        return self.n

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``index`` as numpy arrays: float32 ``[C, H, W]`` and int64 ``[H, W]``."""
        h, w = self.size
        rng = np.random.default_rng([self.seed, int(index)])
        yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
        m = min(h, w)
        radius = rng.uniform(0.22, 0.34) * m
        cy = rng.uniform(radius + 1, h - radius - 1) if h > 2 * radius + 2 else (h - 1) / 2
        cx = rng.uniform(radius + 1, w - radius - 1) if w > 2 * radius + 2 else (w - 1) / 2
        aspect = rng.uniform(0.8, 1.25)
        dist = np.sqrt(((yy - cy) * aspect) ** 2 + ((xx - cx) / aspect) ** 2)
        k = self.num_classes - 1
        label = np.zeros((h, w), dtype=np.int64)
        if self.kind == "brain":  # nested discs, class 1 outermost
            for c in range(1, k + 1):
                label[dist < radius * (1.0 - (c - 1) / (k + 0.5))] = c
        else:  # concentric thin rings, class 1 outermost
            thick = max(1.5, 0.05 * m)
            for c in range(1, k + 1):
                r = radius * (1.0 - (c - 1) / (k + 0.5))
                label[(dist < r) & (dist >= r - thick)] = c
        level = label / float(k)
        smooth = 0.2 * np.sin(xx / w * np.pi * rng.uniform(0.5, 2.0) + rng.uniform(0, 2 * np.pi))
        image = np.empty((self.in_channels, h, w), dtype=np.float32)
        for c in range(self.in_channels):
            image[c] = self.gain[c] * level + self.bias[c] + smooth + self.noise * rng.standard_normal((h, w))
        return image, label

    def read_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if indices.size and (indices.min() < 0 or indices.max() >= self.n):
            raise IndexError(f"indices out of range for {self.n} items")
        if self._arrays is not None:
            images, labels = (a[indices] for a in self._arrays)
        else:
            images, labels = (np.stack(a) for a in zip(*(self.sample(int(i)) for i in indices)))
        return torch.from_numpy(images), torch.from_numpy(labels)
