"""Segmentation losses on logits ``[N, C, H, W]`` and integer targets ``[N, H, W]`` (3D: ``[N, C, D, H, W]`` and
``[N, D, H, W]``).

Every loss is the mean over the batch of a per-sample loss. Hence, for
samples of equal size, the loss (and its gradient) on a batch of ``2b``
equals the mean over two batches of ``b``, so averaging gradients across
data-parallel ranks gives exactly the single-process result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check(logits: torch.Tensor, target: torch.Tensor) -> tuple[int, ...]:
    """The spatial dimensions of ``logits`` (to sum over); ValueError unless the target matches them."""
    if logits.dim() not in (4, 5) or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"expected logits [N, C, H, W] and target [N, H, W] (3D: [N, C, D, H, W] and [N, D, H, W]), got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    return tuple(range(2, logits.dim()))


def _onehot(target: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``[N, *S]`` integer labels as ``[N, classes, *S]``."""
    return F.one_hot(target, classes).movedim(-1, 1).to(dtype)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``1 - soft Dice``, with the Dice computed per sample and averaged over samples.

    For C > 1 the Dice of each sample is the mean, over the classes present in that sample's target,
    of ``(2 sum(p t) + eps) / (sum(p) + sum(t) + eps)`` on softmax probabilities ``p`` and one-hot
    targets ``t``. A class absent from a slice adds no Dice term there (its near-zero Dice would push
    its probability down everywhere, and a small class that most slices lack would never be
    predicted); cross-entropy still penalises predicting it. For C == 1 it is the binary foreground
    Dice on sigmoid probabilities. Unlike a Dice pooled over the whole batch, this per-sample mean
    decomposes over data-parallel ranks.
    """
    spatial = _check(logits, target)
    if logits.shape[1] == 1:
        probs = torch.sigmoid(logits)
        onehot = target.unsqueeze(1).to(probs.dtype)
    else:
        probs = torch.softmax(logits, dim=1)
        onehot = _onehot(target, logits.shape[1], probs.dtype)
    intersection = (probs * onehot).sum(dim=spatial)
    truth = onehot.sum(dim=spatial)
    dice = (2 * intersection + eps) / (probs.sum(dim=spatial) + truth + eps)
    if logits.shape[1] == 1:
        return 1 - dice.mean()
    present = (truth > 0).to(dice.dtype)
    return 1 - ((dice * present).sum(dim=1) / present.sum(dim=1).clamp(min=1)).mean()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-mean cross-entropy (binary cross-entropy with logits for C == 1)."""
    _check(logits, target)
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], target.to(logits.dtype))
    if logits.is_cuda and torch.are_deterministic_algorithms_enabled():
        # deterministic mode: CUDA's nll_loss2d has no deterministic kernel; this is the same mean
        logp = F.log_softmax(logits, dim=1)
        onehot = _onehot(target, logits.shape[1], logp.dtype)
        return -(logp * onehot).sum(dim=1).mean()
    return F.cross_entropy(logits, target)


def dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of :func:`dice_loss` and :func:`cross_entropy`."""
    return dice_loss(logits, target) + cross_entropy(logits, target)


def deep_supervision_weights(outputs: int) -> list[float]:
    """nnU-Net's weights of the outputs of a deeply supervised network (full resolution first): halving per
    level, normalised to sum to 1."""
    weights = [0.5**level for level in range(outputs)]
    return [w / sum(weights) for w in weights]


def supervised(loss: Loss) -> Callable[[torch.Tensor | Sequence[torch.Tensor], torch.Tensor], torch.Tensor]:
    """``loss`` that also takes the tuple a deeply supervised network returns while training (the logits, then
    those of lower decoder levels): the weighted sum (:func:`deep_supervision_weights`) of ``loss`` on each
    output against the target downsampled to its size (nearest: no new label values)."""

    def combined(logits, target: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, torch.Tensor):
            return loss(logits, target)
        weights = deep_supervision_weights(len(logits))
        total = loss(logits[0], target) * weights[0]
        for output, weight in zip(logits[1:], weights[1:]):
            small = F.interpolate(target.unsqueeze(1).float(), size=output.shape[2:], mode="nearest")
            total = total + weight * loss(output, small.squeeze(1).to(target.dtype))
        return total

    combined.__doc__ = loss.__doc__
    return combined


LOSSES: dict[str, Loss] = {
    "dice": dice_loss,
    "ce": cross_entropy,
    "cross_entropy": cross_entropy,
    "dice_ce": dice_ce,
}


def get_loss(name: str) -> Loss:
    """Return the loss registered under ``name``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {sorted(LOSSES)}")
    return LOSSES[name]
