"""Learning-rate policy: the base learning rate, whatever the number of ranks."""

from __future__ import annotations

from autocnnp.generator.protocols import LRPolicy
from autocnnp.generator.registry import component


@component("constant", frameworks=("torch", "tensorflow"))
class Constant(LRPolicy):
    """The base learning rate on every step, not scaled with the number of ranks."""

    def rate(self, t: int) -> float:
        return self.base_lr

    def describe(self) -> str:
        return f"constant lr {self.base_lr:g} (not scaled with the {self.replicas} replicas)"
