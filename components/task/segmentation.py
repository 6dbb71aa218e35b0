"""Image segmentation task: its losses and its SegEval evaluator."""

from __future__ import annotations

from autocnnp.training.losses import get_loss
from autocnnp.training.metrics import SegEval


class SegmentationTask:
    """Pixel-wise classification into ``num_classes`` labels."""

    def loss(self, name: str):
        return get_loss(name)

    def evaluator(self, num_classes: int) -> SegEval:
        return SegEval(max(num_classes, 2))
