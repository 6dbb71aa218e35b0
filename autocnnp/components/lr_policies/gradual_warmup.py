"""Learning-rate policy: gradual warmup to the linearly scaled learning rate (Goyal et al.)."""

from __future__ import annotations

from dataclasses import dataclass

from autocnnp.generator.registry import component

from .scaling import Warmup, WarmupConfig


@dataclass
class Config(WarmupConfig):
    """The warmup and whether to scale."""


@component("gradual_warmup", frameworks=("torch", "tensorflow"))
class GradualWarmup(Warmup):
    """Linear scaling rule with a per-step gradual warmup from the base lr (Goyal et al.), then constant."""

    def rate(self, t: int) -> float:
        return self.warm(t)

    def describe(self) -> str:
        return f"gradual warmup: {self._warmup_text()}, then constant"
