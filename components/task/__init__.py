"""Task definition and hyperparameter injection (both non-extensible)."""

from dataclasses import dataclass, field
from typing import Literal

from autocnnp.generator.registry import HYPERPARAMETERS, TASKS


@dataclass
class SegmentationConfig:
    """``<task name="imaging_segmentation">``; classes and channels come from the dataset."""


@dataclass
class Hyperparameters:
    """``<hyperparameters>``: thesis defaults (SGD, lr 1e-5, dice loss, batch 10 per rank)."""

    lr: float = field(default=1e-5, metadata={"gt": 0.0})
    optimiser: Literal["sgd", "adam"] = field(default="sgd", metadata={"aliases": ("optimizer",)})
    momentum: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    loss: Literal["dice", "ce", "dice_ce"] = "dice"
    minibatch_size: int = field(default=10, metadata={"min": 1, "aliases": ("batch_size",)})
    start_epoch: int = field(default=0, metadata={"min": 0})
    end_epoch: int = field(default=120, metadata={"min": 1})
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype for forward/loss
    channels_last: bool = False  # NHWC memory format (faster convolutions on recent GPUs)
    loader_workers: int = field(default=0, metadata={"min": 0})  # DataLoader worker processes per rank
    # bit-identical reruns: deterministic kernels, one CPU thread per rank, seeded loaders (training/determinism.py)
    deterministic: bool = False

    def __post_init__(self):
        if self.end_epoch <= self.start_epoch:
            raise ValueError(f"end_epoch ({self.end_epoch}) must be greater than start_epoch ({self.start_epoch})")


for name in ("imaging_segmentation", "segmentation"):
    TASKS.register(name, "autocnnp.components.task.segmentation:SegmentationTask", SegmentationConfig,
                   "pixel-wise classification scored with SegEval (Dice, PA, MA, mean IoU, fw IoU)")
HYPERPARAMETERS.register("xml", "autocnnp.components.task:Hyperparameters", Hyperparameters,
                         "typed values of <hyperparameters> handed to the training strategy")
