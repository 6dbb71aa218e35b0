"""Segmentation losses on logits ``[N, C, H, W]`` and integer targets ``[N, H, W]``.

Every loss is the mean over the batch of a per-sample loss. Hence, for
samples of equal size, the loss (and its gradient) on a batch of ``2b``
equals the mean over two batches of ``b``, so averaging gradients across
data-parallel ranks gives exactly the single-process result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"expected logits [N, C, H, W] and target [N, H, W], got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )


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
    _check(logits, target)
    if logits.shape[1] == 1:
        probs = torch.sigmoid(logits)
        onehot = target.unsqueeze(1).to(probs.dtype)
    else:
        probs = torch.softmax(logits, dim=1)
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    intersection = (probs * onehot).sum(dim=(2, 3))
    truth = onehot.sum(dim=(2, 3))
    dice = (2 * intersection + eps) / (probs.sum(dim=(2, 3)) + truth + eps)
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
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(logp.dtype)
        return -(logp * onehot).sum(dim=1).mean()
    return F.cross_entropy(logits, target)


def dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of :func:`dice_loss` and :func:`cross_entropy`."""
    return dice_loss(logits, target) + cross_entropy(logits, target)


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
