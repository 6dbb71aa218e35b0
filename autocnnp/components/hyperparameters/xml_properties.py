"""Hyperparameters injection: the typed ``<hyperparameters>`` properties handed to training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from autocnnp.core.settings import setting
from autocnnp.generator.registry import component


@dataclass
class Config:
    """``<hyperparameters>``: thesis defaults (SGD, lr 1e-5, dice loss, batch 10 per rank, 120 epochs)."""

    lr: float = setting(1e-5, gt=0.0, help="base learning rate (the LR policy scales and schedules it)")
    optimizer: Literal["sgd", "adam"] = setting("sgd", aliases=("optimiser",), help="sgd (with momentum) or adam")
    momentum: float = setting(0.9, min=0.0, max=1.0, help="SGD momentum")
    weight_decay: float = setting(0.0, min=0.0, help="L2 weight decay")
    loss: Literal["dice", "ce", "dice_ce"] = setting("dice", help="dice, cross-entropy or their sum")
    minibatch_size: int = setting(10, min=1, aliases=("batch_size",), help="samples per rank and step")
    start_epoch: int = setting(0, min=0, help="first epoch (0-based)")
    end_epoch: int = setting(120, min=1, help="train until this epoch (exclusive)")
    precision: Literal["fp32", "bf16", "fp16"] = setting("fp32", help="autocast dtype of forward and loss")
    channels_last: bool = setting(False, help="NHWC memory format (faster convolutions on recent GPUs)")
    loader_workers: int = setting(0, min=0, help="DataLoader worker processes per rank")
    deterministic: bool = setting(False, help="bit-identical reruns: deterministic kernels, one CPU thread per rank, "
                                              "seeded loaders (training/determinism.py)")

    def __post_init__(self):
        if self.end_epoch <= self.start_epoch:
            raise ValueError(f"end_epoch ({self.end_epoch}) must be greater than start_epoch ({self.start_epoch})")


@component("xml", frameworks=("torch", "tensorflow"))
def inject(config: Config) -> Config:
    """Typed values of <hyperparameters> handed to the training strategy."""
    return config
