"""Running a trained network over whole volumes for ``autocnnp predict``: a :class:`Predictor` (the network on its
device, its arithmetic and batches) gives class probabilities of a volume's slices (2D networks) or of its
whole volume through a :class:`~autocnnp.training.sliding_window.SlidingWindow` (3D networks); the data format's
volume transform (protocols.VolumeTransform) decides which and brings them back to the source grid."""

from __future__ import annotations

import collections
import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..data import slices as slicing
from ..data.batches import channels_last_network
from ..data.slices import resize
from .sliding_window import SlidingWindow, flip_mean, probabilities_of


@dataclass(frozen=True)
class Predictor:
    """A network ready for inference (eval mode, on ``device``) and how it runs: ``batch_size`` slices or
    windows per forward pass (None: :func:`default_batch`), flip test-time augmentation (``tta``), the autocast
    ``dtype`` (None: float32) and channels_last batches. A network giving ``groups`` sets of logits side by side
    (an ensemble and each member) gives their probabilities side by side (:class:`SharedPass` splits them)."""

    model: torch.nn.Module
    device: torch.device
    batch_size: int | None
    tta: bool
    dtype: torch.dtype | None
    channels_last: bool
    groups: int = 1

    def slices(self, slices: np.ndarray) -> tuple[np.ndarray, float]:
        """Softmax probabilities ``[Z, K, h, w]`` of a volume's slices ``[Z, C, h, w]`` and the seconds spent."""
        batch = self.batch_size or default_batch(self.device, slices.shape[-1])
        return slice_probabilities(self.model, slices, batch, self.device, self.tta, self.dtype, self.channels_last,
                                   self.groups)

    @staticmethod
    def slices_to_source(probs: np.ndarray, plane: tuple[int, int], keep: bool):
        """Labels and (``keep``) probabilities on the source grid of slice probabilities (:func:`source_grid`)."""
        return source_grid(probs, plane, keep)

    def volume(self, volume: np.ndarray, patch, overlap: float) -> tuple[torch.Tensor, float, int]:
        """Class probabilities ``[K, D, H, W]`` (float32, on the CPU) of a whole volume ``[C, D, H, W]``, windows of
        side ``patch`` overlapping by ``overlap`` (mirrored along the three axes with ``tta``), the seconds spent
        and the number of windows."""
        start = time.perf_counter()
        window = SlidingWindow(patch, overlap, batch=self.batch_size or default_windows(self.device),
                               mirror=self.tta, dtype=self.dtype)
        probs = window.probabilities(self.model, torch.from_numpy(volume)[None], self.groups)[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        padded = [max(side, p) for side, p in zip(volume.shape[1:], patch)]
        return probs, time.perf_counter() - start, len(window.windows(padded))


class SharedPass:
    """One network pass per volume for an ensemble and each of its members: ``view(0)`` runs ``predictor`` (its
    network an :class:`~autocnnp.training.ensemble.Ensemble` with ``each``) and gives the ensemble's probabilities,
    ``view(i)`` then gives member ``i - 1``'s of that same pass, without running anything. Each view stands for a
    :class:`Predictor` to a volume transform, which calls its views in turn on the same volume."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.pending: list[collections.deque] = [collections.deque() for _ in range(predictor.groups)]

    def view(self, group: int) -> _GroupView:
        return _GroupView(self, group)

    def take(self, group: int, run: Callable[[Predictor], tuple], axis: int) -> tuple:
        """The result of ``run`` (probabilities with the groups along ``axis``, then its other values) for
        ``group``: group 0 runs it and keeps the others' shares for their views, which take them in order."""
        if group == 0:
            probs, *rest = run(self.predictor)
            groups = self.predictor.groups
            parts = np.split(probs, groups, axis) if isinstance(probs, np.ndarray) else probs.chunk(groups, axis)
            for index, part in enumerate(parts):
                self.pending[index].append((part, *rest))
        return self.pending[group].popleft()


@dataclass(frozen=True)
class _GroupView:
    """A :class:`SharedPass`'s ``group`` with a :class:`Predictor`'s methods."""

    shared: SharedPass
    group: int
    slices_to_source = staticmethod(Predictor.slices_to_source)

    def slices(self, slices: np.ndarray) -> tuple[np.ndarray, float]:
        return self.shared.take(self.group, lambda predictor: predictor.slices(slices), 1)

    def volume(self, volume: np.ndarray, patch, overlap: float) -> tuple[torch.Tensor, float, int]:
        return self.shared.take(self.group, lambda predictor: predictor.volume(volume, patch, overlap), 0)


def default_windows(device) -> int:
    """3D windows per forward pass: 2 on a GPU, 1 on a CPU (a window's activations are large already)."""
    return 2 if device.type == "cuda" else 1


def default_batch(device, size: int) -> int:
    """Slices per forward pass: 16 on a GPU; on a CPU as many as hold the pixels of one 512 x 512 slice (at most
    16): larger batches of large slices were slower per slice there (U-Net at 512 x 512 on 2 cores: 458 ms
    a slice one at a time, 607 ms in batches of 8: activations of hundreds of MB cost page faults)."""
    return 16 if device.type == "cuda" else max(1, min(16, (512 * 512) // (size * size)))


def prepare_network(model, device, channels_last: bool):
    """``model`` on ``device`` for inference (eval mode), its weights in channels_last (channels_last_3d for a 3D
    network) when asked."""
    model = model.to(device).eval()
    if not channels_last:
        return model
    return channels_last_network(model)


def slice_probabilities(model, slices, batch_size: int, device, flips: bool, dtype, channels_last: bool,
                        groups: int = 1):
    """Softmax probabilities ``[Z, C, H, W]`` (float32) of a volume's slices ``[Z, C_in, H, W]``, run through
    the network ``batch_size`` slices at a time and written into one array allocated for the volume; averaged
    over flips when asked. ``dtype`` is the autocast dtype (None: float32), ``channels_last`` the batches'
    memory format. On a GPU the volume and the array sit in pinned host memory and the copies are
    asynchronous, so the next batch is queued while the GPU works. Returns them and the seconds spent
    (copies and network). ``groups``: see :func:`~autocnnp.training.sliding_window.probabilities_of`."""
    cuda = device.type == "cuda"
    layout = torch.channels_last if channels_last else torch.contiguous_format
    views = [(), (-1,), (-2,)] if flips else [()]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    start = time.perf_counter()
    source = torch.from_numpy(np.ascontiguousarray(slices))
    if cuda:
        source = source.pin_memory()
    out = None
    with torch.inference_mode(), autocast:
        for lo in range(0, len(source), batch_size):
            batch = source[lo:lo + batch_size].to(device, non_blocking=cuda).contiguous(memory_format=layout)
            probs = flip_mean(model, batch, views, functools.partial(probabilities_of, groups=groups))
            if out is None:
                out = torch.empty((len(source), *probs.shape[1:]), dtype=torch.float32, pin_memory=cuda)
            out[lo:lo + len(probs)].copy_(probs.contiguous(), non_blocking=cuda)
    if cuda:
        torch.cuda.synchronize(device)
    return out.numpy(), time.perf_counter() - start


def source_grid(probs, plane: tuple[int, int], keep: bool):
    """``(labels, probabilities)`` of slice probabilities ``[Z, C, h, w]`` resized bilinearly back to the source's
    ``plane`` ``(X, Y)``: the argmax as a uint8 volume ``(X, Y, Z)``, and (``keep``) the probabilities
    ``(C, X, Y, Z)`` in float32, else None. A few slices at a time, into Fortran-ordered volumes: NIfTI's order,
    written without another copy."""
    depth, classes = probs.shape[:2]
    x, y = plane
    labels = np.empty((depth, y, x), np.uint8)  # the memory of a Fortran-ordered (X, Y, Z)
    grid = np.empty((classes, depth, y, x), np.float32) if keep else None
    step = max(1, slicing.CHUNK_BYTES // (classes * x * y * 4))
    for lo in range(0, depth, step):
        part = resize(probs[lo:lo + step], plane).transpose(1, 0, 3, 2)  # [C, n, Y, X]
        best, chosen = part[0].copy(), labels[lo:lo + step]
        chosen[...] = 0
        for k in range(1, classes):  # the argmax (the first of ties) in C - 1 passes: 40x numpy's over an inner axis
            chosen[part[k] > best] = k
            np.maximum(best, part[k], out=best)
        if grid is not None:
            grid[:, lo:lo + step] = part
    return labels.T, None if grid is None else grid.transpose(0, 3, 2, 1)
