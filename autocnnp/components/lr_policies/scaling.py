"""The linear scaling rule and gradual warmup (Goyal et al., "Accurate, Large Minibatch SGD", 2017),
shared by the policies that build on them."""

from __future__ import annotations

from dataclasses import dataclass

from autocnnp.core.settings import setting
from autocnnp.generator.protocols import LRPolicy


@dataclass
class ScalingConfig:
    scale: bool = setting(True, aliases=("linear_scaling", "scaling"),
                          help="linear scaling rule: target lr = base lr x replicas")


@dataclass
class WarmupConfig(ScalingConfig):
    warmup_epochs: int = setting(5, min=0, aliases=("warmup", "warmup_period"),
                                 help="epochs of the per-step ramp from the base lr to the target lr")


class Scaled(LRPolicy):
    """A policy whose target is the base lr, times the replicas when ``config.scale``."""

    def __init__(self, config: ScalingConfig, **run):
        super().__init__(config, **run)
        self.target_lr = self.base_lr * (self.replicas if config.scale else 1)

    def _target_text(self) -> str:
        if not self.config.scale:
            return f"{self.target_lr:g} (no scaling)"
        return f"base_lr {self.base_lr:g} x {self.replicas} replicas = {self.target_lr:g} (linear scaling rule)"


class Warmup(Scaled):
    """A linear per-step ramp from the base lr to the target lr over ``warmup_epochs`` epochs."""

    def __init__(self, config: WarmupConfig, **run):
        super().__init__(config, **run)
        self.warmup_epochs = config.warmup_epochs
        self.warmup_steps = self.warmup_epochs * self.steps_per_epoch

    def warm(self, t: int) -> float:
        if t >= self.warmup_steps:
            return self.target_lr
        return self.base_lr + (self.target_lr - self.base_lr) * t / self.warmup_steps

    def _warmup_text(self) -> str:
        if self.warmup_epochs == 0:
            return f"lr {self._target_text()}, no warmup"
        text = (f"lr ramps linearly per step from {self.base_lr:g} to {self._target_text()} over "
                f"{self.warmup_epochs} epoch(s) ({self.warmup_steps} steps)")
        if self.warmup_epochs >= self.total_epochs:
            text += f" [the run has only {self.total_epochs} epoch(s): the target lr is never reached]"
        return text
