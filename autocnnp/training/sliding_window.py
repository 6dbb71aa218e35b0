"""Sliding-window inference of a 3D network over whole volumes (as nnU-Net and MONAI).

A volume ``[B, C, D, H, W]`` is covered by patch-sized windows overlapping by ``overlap``; each window's output is
weighted by a Gaussian importance map (sigma = 1/8 of the patch side, nnU-Net's) that trusts a window's centre more
than its border, and the weighted outputs are accumulated into one volume-sized array, then divided by the summed
weights. Windows run through the network ``batch`` at a time; nothing but that one array and a batch of windows is
held, so memory is bounded by the volume, not by the number of windows.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

SIGMA_SCALE = 1 / 8  # nnU-Net's: the Gaussian's sigma is 1/8 of the patch side


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows of side ``patch`` covering ``size`` voxels (``size >= patch``), neighbours
    overlapping by at least ``overlap`` of a patch, spread evenly with the last one flush with the end."""
    if size <= patch:
        return [0]
    stride = patch * (1 - overlap)
    count = math.ceil((size - patch) / stride) + 1
    step = (size - patch) / (count - 1)
    return [round(step * i) for i in range(count)]


def gaussian_importance(patch: Sequence[int], sigma_scale: float = SIGMA_SCALE) -> torch.Tensor:
    """The importance map ``[D, H, W]`` (float32): a separable Gaussian centred on the patch, maximum 1,
    ``sigma = sigma_scale * side`` per axis; never 0, so every voxel a window covers gets a weight."""
    weights = torch.ones((), dtype=torch.float64)
    for side in patch:
        position = torch.arange(side, dtype=torch.float64) - (side - 1) / 2
        axis = torch.exp(-0.5 * (position / (sigma_scale * side)) ** 2)
        weights = weights.unsqueeze(-1) * axis
    weights = weights / weights.max()
    return weights.clamp(min=torch.finfo(torch.float32).tiny).float()


def probabilities_of(logits: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Class probabilities in float32; one logit channel is the foreground of two classes (sigmoid). ``groups``
    sets of logits side by side along the channels (an ensemble and each member) give theirs side by side."""
    if groups > 1:
        return torch.cat([probabilities_of(part) for part in logits.chunk(groups, dim=1)], dim=1)
    logits = logits.float()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def flip_mean(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, flips: Sequence[tuple[int, ...]],
              head: Callable[[torch.Tensor], torch.Tensor] = probabilities_of) -> torch.Tensor:
    """``head(model(x))`` averaged over the flips of ``x`` along each tuple of axes in ``flips`` (``()``: as is),
    each output flipped back (test-time augmentation)."""
    total = None
    for dims in flips:
        result = head(model(x.flip(dims)) if dims else model(x))
        result = result.flip(dims) if dims else result
        total = result if total is None else total + result
    return total / len(flips)


class SlidingWindow:
    """Whole-volume inference with overlapping, Gaussian-weighted windows of side ``patch`` ``(D, H, W)``.

    ``batch`` windows go through the network at once; ``mirror`` averages each window over its 8 flips along the
    three spatial axes (test-time augmentation); ``dtype`` is the autocast dtype (bf16/fp16; None: float32).
    Volumes smaller than the patch along an axis are zero-padded (centred) to it, and the output cropped back.
    """

    def __init__(self, patch: Sequence[int], overlap: float = 0.5, batch: int = 1, mirror: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        if len(patch) != 3 or min(patch) < 1:
            raise ValueError(f"patch must be three positive sides (D, H, W), got {tuple(patch)}")
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.patch = tuple(int(side) for side in patch)
        self.overlap = overlap
        self.batch = batch
        self.mirror = mirror
        self.dtype = dtype
        self.importance = gaussian_importance(self.patch)

    def __call__(self, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The Gaussian-weighted mean of the windows' logits: ``[B, K, D, H, W]`` float32 on ``x``'s device."""
        return self._infer(model, x, lambda logits: logits.float())

    def probabilities(self, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      groups: int = 1) -> torch.Tensor:
        """The Gaussian-weighted mean of the windows' class probabilities (softmax; sigmoid of one channel as
        two classes): ``[B, K, D, H, W]`` float32 on ``x``'s device (``groups`` sets side by side: see
        :func:`probabilities_of`)."""
        return self._infer(model, x, functools.partial(probabilities_of, groups=groups))

    def windows(self, shape: Sequence[int]) -> list[tuple[slice, slice, slice]]:
        """The windows covering a (padded) volume of spatial ``shape``: one slice per axis."""
        starts = [window_starts(size, patch, self.overlap) for size, patch in zip(shape, self.patch)]
        return [tuple(slice(s, s + p) for s, p in zip(corner, self.patch))
                for corner in itertools.product(*starts)]

    def _infer(self, model, x: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"expected a volume [B, C, D, H, W], got {tuple(x.shape)}")
        device = _device_of(model, x)
        x, crop = _pad_to(x, self.patch)
        importance = self.importance.to(x.device)
        windows = self.windows(x.shape[2:])
        # the 8 flips along the spatial axes of a batch of windows when mirroring
        flips = [dims for n in range(4) for dims in itertools.combinations((2, 3, 4), n)] if self.mirror else [()]
        weights = torch.zeros(x.shape[2:], dtype=torch.float32, device=x.device)
        for window in windows:
            weights[window] += importance
        out = None
        autocast = (torch.autocast(device.type, dtype=self.dtype) if self.dtype is not None
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            for item in range(x.shape[0]):
                for chunk in _chunks(windows, self.batch):
                    tiles = torch.stack([x[item][(slice(None), *window)] for window in chunk]).to(device)
                    result = flip_mean(model, tiles, flips, head).to(x.device)
                    if out is None:
                        out = torch.zeros((x.shape[0], result.shape[1], *x.shape[2:]), dtype=torch.float32,
                                          device=x.device)
                    for window, tile in zip(chunk, result):
                        out[item][(slice(None), *window)] += tile * importance
        out /= weights
        return out[(slice(None), slice(None), *crop)]


def _device_of(model, x: torch.Tensor) -> torch.device:
    """Where the windows go: the device of the network's parameters (``x``'s for a parameterless callable)."""
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else x.device


def _pad_to(x: torch.Tensor, patch: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """``x`` zero-padded (centred) to at least ``patch`` along each spatial axis, and the slices cropping it back."""
    before = [max(0, p - size) // 2 for size, p in zip(x.shape[2:], patch)]
    after = [max(0, p - size) - b for size, p, b in zip(x.shape[2:], patch, before)]
    if not any(before) and not any(after):
        return x, (slice(None),) * 3
    pad = [amount for b, a in zip(reversed(before), reversed(after)) for amount in (b, a)]
    crop = tuple(slice(b, b + size) for b, size in zip(before, x.shape[2:]))
    return F.pad(x, pad), crop


def _chunks(items: list, size: int) -> Iterator[list]:
    for lo in range(0, len(items), size):
        yield items[lo:lo + size]
