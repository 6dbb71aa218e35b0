"""SegEval segmentation metrics computed from a confusion matrix.

``n[i, j]`` counts pixels of true class ``i`` predicted as class ``j``;
``t_i = sum_j n[i, j]`` is the number of pixels of true class ``i``.

* Dice: ``(1/n_cl) sum_i 2 n_ii / (2 n_ii + sum_{j!=i} n_ij + sum_{j!=i} n_ji)``
* pixel accuracy: ``sum_i n_ii / sum_i t_i``
* mean accuracy: ``(1/n_cl) sum_i n_ii / t_i``
* mean IoU: ``(1/n_cl) sum_i n_ii / (t_i + sum_j n_ji - n_ii)``
* frequency-weighted IoU: ``(sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)``

Absent-class rule: a class that occurs neither in the truth nor in the
prediction has a zero Dice/IoU denominator and is left out of the class
means, so ``n_cl`` counts only classes present in truth or prediction. For
mean accuracy, classes with ``t_i = 0`` are left out.
"""

from __future__ import annotations

import numpy as np
import torch


def _check_range(values: torch.Tensor, num_classes: int, name: str) -> None:
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.numel():
        raise ValueError(
            f"{name} value {bad[0].item()} is outside [0, {num_classes})"
        )


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Confusion matrix ``[C, C]`` (int64, rows = truth, columns = prediction).

    Raises ValueError on a shape mismatch or a label outside ``[0, num_classes)``.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    pred, target = pred.long().flatten(), target.long().flatten()
    _check_range(target, num_classes, "target")
    _check_range(pred, num_classes, "pred")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def segmentation_metrics(conf: torch.Tensor | np.ndarray) -> dict[str, float]:
    """The five SegEval metrics of a confusion matrix (numpy or torch), in float64."""
    if isinstance(conf, torch.Tensor):
        conf = conf.detach().cpu().numpy()
    n = np.asarray(conf, dtype=np.float64)
    if n.ndim != 2 or n.shape[0] != n.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {n.shape}")
    total = n.sum()
    if total == 0:
        raise ValueError("confusion matrix is empty (no pixels counted)")
    hits = np.diag(n)
    truth = n.sum(axis=1)
    predicted = n.sum(axis=0)
    present = truth + predicted > 0
    union = truth + predicted - hits
    iou = hits[present] / union[present]
    return {
        "dice": float(np.mean(2 * hits[present] / (truth + predicted)[present])),
        "pixel_accuracy": float(hits.sum() / total),
        "mean_accuracy": float(np.mean(hits[truth > 0] / truth[truth > 0])),
        "mean_iou": float(np.mean(iou)),
        "fw_iou": float(np.sum(truth[present] * iou) / total),
    }


class SegEval:
    """Accumulates a confusion matrix over batches (and ranks) and reports metrics.

    Scores are always computed from the summed confusion matrix, never by
    averaging per-batch or per-rank scores.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (use 2 for binary), got {num_classes}")
        self.num_classes = num_classes
        self._conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, logits_or_pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: float logits ``[N, C, H, W]`` or integer predictions ``[N, H, W]``.

        Logits are reduced by argmax over C; single-channel logits are
        thresholded at sigmoid probability 0.5 (background 0, foreground 1).
        """
        pred = logits_or_pred
        if pred.is_floating_point():
            if pred.dim() != 4:
                raise ValueError(f"logits must be [N, C, H, W], got {tuple(pred.shape)}")
            pred = (pred[:, 0] > 0).long() if pred.shape[1] == 1 else pred.argmax(dim=1)
        self._conf += confusion_matrix(pred, target, self.num_classes).cpu()

    @property
    def confusion(self) -> torch.Tensor:
        """Copy of the accumulated confusion matrix."""
        return self._conf.clone()

    def reset(self) -> None:
        """Clear the accumulated counts."""
        self._conf.zero_()

    def all_reduce(self, reduce) -> None:
        """Sum the confusion matrix over all ranks with ``reduce`` (tensor -> summed tensor), e.g.
        ``World.all_reduce``. Call once per evaluation, after the last ``update``: a second call
        would count the other ranks' pixels again.
        """
        if reduce is not None:
            self._conf = reduce(self._conf).cpu()

    def compute(self) -> dict[str, float]:
        """Metrics of the accumulated confusion matrix."""
        return segmentation_metrics(self._conf)
