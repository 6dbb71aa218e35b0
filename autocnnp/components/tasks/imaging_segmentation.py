"""Image segmentation task: its losses and its SegEval evaluator."""

from __future__ import annotations

from autocnnp.generator.registry import component
from autocnnp.training.losses import get_loss
from autocnnp.training.metrics import SegEval


@component("imaging_segmentation", aliases=("segmentation",))
class SegmentationTask:
    """Pixel-wise classification scored with SegEval (Dice, PA, MA, mean IoU, fw IoU)."""

    def loss(self, name: str):
        return get_loss(name)

    def evaluator(self, num_classes: int) -> SegEval:
        return SegEval(max(num_classes, 2))
