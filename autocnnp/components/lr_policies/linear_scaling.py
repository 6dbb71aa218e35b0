"""Learning-rate policy: the linear scaling rule (Goyal et al.), no warmup."""

from __future__ import annotations

from dataclasses import dataclass

from autocnnp.generator.registry import component

from .scaling import Scaled, ScalingConfig


@dataclass
class Config(ScalingConfig):
    """Whether to scale the base lr with the replicas."""


@component("linear_scaling", frameworks=("torch", "tensorflow"))
class LinearScaling(Scaled):
    """Linear scaling rule (Goyal et al.): lr = base lr x world size, no warmup."""

    def rate(self, t: int) -> float:
        return self.target_lr

    def describe(self) -> str:
        if not self.config.scale:
            return f"constant lr {self.target_lr:g} (scaling switched off)"
        return f"linear scaling rule: lr = {self._target_text().removesuffix(' (linear scaling rule)')}, no warmup"
