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

Per-class and region scores for reports (``class_scores``, ``foreground_dice``,
``region_dice``) use ``p_j = sum_i n[i, j]``, the number of pixels predicted
as class ``j``: Dice ``2 n_ii / (t_i + p_i)``, IoU ``n_ii / (t_i + p_i - n_ii)``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a function needs it: `autocnnp evaluate` scores numpy volumes without it
    import torch

from ..core.metrics import BRATS_REGIONS, FOREGROUND_DICE, class_metric

__all__ = ["BRATS_REGIONS", "SegEval", "class_scores", "confusion_matrix", "foreground_dice", "region_dice",
           "report", "segmentation_metrics", "volume_confusion"]


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
    import torch

    pred, target = pred.long().flatten(), target.long().flatten()
    _check_range(target, num_classes, "target")
    _check_range(pred, num_classes, "pred")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def volume_confusion(pred: np.ndarray, target: np.ndarray, num_classes: int, slab: int = 1 << 22) -> np.ndarray:
    """:func:`confusion_matrix` of two label volumes (numpy, non-negative integers, any memory layout), counted
    along the last axis about ``slab`` voxels at a time: no int64 copy of a whole volume is made."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    for name, values in (("target", target), ("pred", pred)):
        top = int(values.max(initial=0))
        if top >= num_classes or values.min(initial=0) < 0:
            raise ValueError(f"{name} value {top if top >= num_classes else int(values.min())} is outside "
                             f"[0, {num_classes})")
    counts = np.zeros(num_classes**2, dtype=np.int64)
    step = max(1, slab // max(1, int(np.prod(pred.shape[:-1]))))
    for lo in range(0, pred.shape[-1], step):
        codes = target[..., lo:lo + step].astype(np.intp) * num_classes + pred[..., lo:lo + step]
        counts += np.bincount(codes.ravel(order="K"), minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def segmentation_metrics(conf: torch.Tensor | np.ndarray) -> dict[str, float]:
    """The five SegEval metrics of a confusion matrix (numpy or torch), in float64."""
    n = _square_matrix(conf)
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
    averaging per-batch or per-rank scores. :meth:`compute` reports the five
    SegEval metrics and, with :func:`report`, the mean foreground Dice, the
    Dice and IoU of every class (named ``class_names``) and the Dice of
    every region (groups of classes).
    """

    def __init__(self, num_classes: int, class_names: tuple[str, ...] = (),
                 regions: Mapping[str, Collection[int]] | None = None) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (use 2 for binary), got {num_classes}")
        self.num_classes = num_classes
        self.class_names = tuple(class_names) or tuple(f"class {i}" for i in range(num_classes))
        self.regions = dict(regions or {})
        region_dice(np.zeros((num_classes, num_classes)), self.regions)  # class values checked now, not at the end
        import torch

        self._conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, logits_or_pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: float logits ``[N, C, H, W]`` or integer predictions ``[N, H, W]`` (``[N, C, D, H, W]`` and
        ``[N, D, H, W]`` in 3D).

        Logits are reduced by argmax over C; single-channel logits are
        thresholded at sigmoid probability 0.5 (background 0, foreground 1).
        """
        pred = logits_or_pred
        if pred.is_floating_point():
            if pred.dim() not in (4, 5):
                raise ValueError(f"logits must be [N, C, H, W] or [N, C, D, H, W], got {tuple(pred.shape)}")
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
        return report(self._conf, self.class_names, self.regions)

    def names(self) -> set[str]:
        """Every metric :meth:`compute` reports when each class occurs."""
        return set(report(np.eye(self.num_classes), self.class_names, self.regions))


def report(conf: torch.Tensor | np.ndarray, class_names: tuple[str, ...] = (),
           regions: Mapping[str, Collection[int]] | None = None) -> dict[str, float]:
    """Everything a run reports of a confusion matrix: the five SegEval metrics, ``dice_fg``, ``dice/NAME``
    and ``iou/NAME`` of every class present (the background's IoU and Dice too) and ``region_dice/NAME``."""
    scores = class_scores(conf)
    names = tuple(class_names) + tuple(f"class {i}" for i in range(len(class_names), len(scores["dice"])))
    out = {**segmentation_metrics(conf), FOREGROUND_DICE: foreground_dice(conf)}
    for family in ("dice", "iou"):
        out.update({class_metric(family, names[i]): float(v) for i, v in enumerate(scores[family]) if v == v})
    out.update({class_metric("region_dice", name): v for name, v in region_dice(conf, regions or {}).items()})
    return out


def _square_matrix(conf: torch.Tensor | np.ndarray) -> np.ndarray:
    if hasattr(conf, "detach"):  # a torch tensor
        conf = conf.detach().cpu().numpy()
    n = np.asarray(conf, dtype=np.float64)
    if n.ndim != 2 or n.shape[0] != n.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {n.shape}")
    return n


def class_scores(conf: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Per-class ``"dice"`` and ``"iou"`` (float64, length C); NaN for a class absent from truth and prediction."""
    n = _square_matrix(conf)
    hits = np.diag(n)
    sizes = n.sum(axis=1) + n.sum(axis=0)
    present = sizes > 0
    dice = np.full(len(n), np.nan)
    iou = np.full(len(n), np.nan)
    dice[present] = 2 * hits[present] / sizes[present]
    iou[present] = hits[present] / (sizes - hits)[present]
    return {"dice": dice, "iou": iou}


def foreground_dice(conf: torch.Tensor | np.ndarray) -> float:
    """Mean Dice over the foreground classes ``1..C-1`` present in truth or prediction.

    If no foreground class is present in truth nor prediction, returns 1.0:
    both agree that nothing is there (BraTS scores two empty masks as 1).
    """
    dice = class_scores(conf)["dice"][1:]
    present = ~np.isnan(dice)
    return float(dice[present].mean()) if present.any() else 1.0


def region_dice(conf: torch.Tensor | np.ndarray, regions: Mapping[str, Collection[int]]) -> dict[str, float]:
    """Dice of each region, the union of its class values (e.g. ``BRATS_REGIONS``).

    ``TP = sum_{i, j in R} n_ij``, ``FP = sum_{i not in R, j in R} n_ij``,
    ``FN = sum_{i in R, j not in R} n_ij``; Dice ``2TP / (2TP + FP + FN)``,
    1.0 when the region is empty in truth and prediction. Raises ValueError
    on a class value outside ``[0, C)``.
    """
    n = _square_matrix(conf)
    num_classes = len(n)
    scores = {}
    for name, values in regions.items():
        bad = [v for v in values if not (isinstance(v, int | np.integer) and 0 <= v < num_classes)]
        if bad:
            raise ValueError(f"region {name!r}: class values {bad} are outside [0, {num_classes})")
        inside = np.zeros(num_classes, dtype=bool)
        inside[list(values)] = True
        tp = n[np.ix_(inside, inside)].sum()
        fp = n[np.ix_(~inside, inside)].sum()
        fn = n[np.ix_(inside, ~inside)].sum()
        scores[name] = float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn > 0 else 1.0
    return scores
