"""Image segmentation task: its losses and its SegEval evaluator."""

from __future__ import annotations

from autocnnp.generator.registry import component
from autocnnp.training.losses import get_loss, supervised
from autocnnp.training.metrics import SegEval


@component("imaging_segmentation", aliases=("segmentation",), frameworks=("torch", "tensorflow"))
class SegmentationTask:
    """Pixel-wise classification scored with SegEval (Dice, PA, MA, mean IoU, fw IoU), the Dice and IoU of
    every class and the Dice of regions (groups of classes)."""

    def loss(self, name: str):
        """The loss ``name``, taking a deeply supervised network's training outputs too (losses.supervised)."""
        return supervised(get_loss(name))

    def evaluator(self, num_classes: int, class_names: tuple[str, ...] = (), regions=None) -> SegEval:
        return SegEval(max(num_classes, 2), class_names, regions)
