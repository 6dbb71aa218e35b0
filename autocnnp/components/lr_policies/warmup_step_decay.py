"""Learning-rate policy: gradual warmup, then step decay at milestone epochs (Goyal et al. 30, 60, 80)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from autocnnp.core.settings import setting
from autocnnp.generator.registry import component

from .scaling import Warmup, WarmupConfig


@dataclass
class Config(WarmupConfig):
    milestones: str = setting("30,60,80", aliases=("decay_at",),
                              help="epochs (0-based) from which the lr is multiplied by decay once more")
    decay: float = setting(0.1, gt=0.0, aliases=("gamma", "decay_factor", "decay_coefficient"),
                           help="factor applied at each milestone")

    def __post_init__(self):
        self.milestone_epochs()

    def milestone_epochs(self) -> tuple[int, ...]:
        """``milestones`` (commas, semicolons or spaces) as strictly increasing epochs after the warmup."""
        parts = [p for p in re.split(r"[,;\s]+", self.milestones.strip()) if p]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"milestones must be whole epoch numbers separated by commas, such as '30,60,80', "
                             f"not {self.milestones!r}") from None
        for m in values:
            if m < 1:
                raise ValueError(f"milestone {m} is not a valid epoch: milestones must be at least 1")
        for a, b in zip(values, values[1:]):
            if b <= a:
                raise ValueError(f"milestones must be strictly increasing, but {b} follows {a}")
        inside = [m for m in values if m < self.warmup_epochs]
        if inside:
            raise ValueError(f"milestone {inside[0]} falls inside the warmup (warmup_epochs={self.warmup_epochs}); "
                             "decay epochs must come at or after the end of the warmup")
        return tuple(values)


@component("warmup_step_decay", frameworks=("torch", "tensorflow"))
class WarmupStepDecay(Warmup):
    """Gradual warmup, then lr x decay at each milestone epoch (Goyal et al. 30,60,80)."""

    def __init__(self, config: Config, **run):
        super().__init__(config, **run)
        self.milestones = config.milestone_epochs()

    def rate(self, t: int) -> float:
        epoch = t // self.steps_per_epoch
        passed = sum(1 for m in self.milestones if m <= epoch)
        return self.warm(t) * self.config.decay ** passed

    def describe(self) -> str:
        text = f"warmup + step decay: {self._warmup_text()}, then x{self.config.decay:g} at epoch(s) " + (
            ", ".join(map(str, self.milestones)) if self.milestones else "(none)")
        late = [m for m in self.milestones if m >= self.total_epochs]
        if late:
            text += f" [milestone(s) {', '.join(map(str, late))} lie beyond the {self.total_epochs}-epoch run]"
        return text
