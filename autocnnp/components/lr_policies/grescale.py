"""Learning-rate policy: GreScale (thesis section 6.3.2).

1. **Warmup** (``warmup_epochs``): per step from ``base_lr`` to the linear-scaling target
   ``base_lr x replicas``. *Adaptive*: when the monitored loss rises at the end of a warmup epoch
   (the instability of thesis Figure 6.1), the warmup is extended by one epoch (up to
   ``max_warmup_epochs``) and the ramp continues from the current lr at a gentler slope. The epoch is
   taken from the stabilisation stage: warmup and stabilisation are interchangeable, the decay stage
   keeps its length.
2. **Stabilisation** (4/7 of the epochs after the default warmup): a reduced lr,
   ``target x stabilisation_scale``. *Feedback-adjusted*: each stabilisation epoch whose monitored loss
   rises multiplies that lr by ``feedback_factor``.
3. **Decay** (``decay_epochs``, default 3/7 of the epochs after the warmup): linear per step from the
   stabilisation lr with slope ``decay_coefficient``: after a fraction p of the stage the lr is
   ``stabilisation lr x max(1 - decay_coefficient x p, 0)``. The default 0.9 ends at 1/10 of it (as
   Goyal et al.'s x0.1); a larger coefficient decays faster (from 1 on the lr reaches 0 before the end).

"Rises" means ``loss > previous x (1 + tolerance)`` or a non-finite loss. The trainer reports each
epoch's metrics through ``on_epoch_end`` (identical on every rank: they are all-reduced) and
checkpoints ``state_dict``, so a resumed run continues with the adjusted schedule. With
``adaptive=false`` the schedule is a pure function of (epoch, step). Across runs the guideline
(``autocnnp tune``) tunes ``base_lr``, ``decay_coefficient``, ``warmup_epochs``, ``decay_epochs``.
The 0.5 stabilisation scale and the decay's shape are this project's choices: the thesis gives no number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from autocnnp.core.metrics import TRAIN_LOSS, VALID_LOSS
from autocnnp.core.settings import setting
from autocnnp.generator.registry import component

from .scaling import Warmup, WarmupConfig


@dataclass
class Config(WarmupConfig):
    """GreScale's stages and feedback. Thesis defaults: 5-epoch warmup, then 4/7 stabilisation and 3/7
    decay of the remaining epochs (use with SGD and lr 1e-5, the hyperparameters' defaults)."""

    stabilisation_scale: float = setting(0.5, gt=0.0, max=1.0, aliases=("stabilization_scale",),
                                         help="stabilisation lr = target lr x this (lowered further by feedback)")
    decay_coefficient: float = setting(0.9, gt=0.0, aliases=("decay_slope",),
                                       help="lr = stabilisation lr x max(1 - coefficient x progress, 0); 0.9 ends at 1/10")
    decay_epochs: int | None = setting(None, min=0, aliases=("decay_period",),
                                       help="length of the decay stage (default: 3/7 of the epochs after the warmup)")
    adaptive: bool = setting(True, help="in-run feedback: extend the warmup, lower the stabilisation lr when the "
                                        "monitored loss rises")
    max_warmup_epochs: int | None = setting(None, min=0, help="the warmup grows up to this (default: warmup + half "
                                                              "the stabilisation)")
    feedback_factor: float = setting(0.5, gt=0.0, max=0.999, help="stabilisation lr x this when the loss rises")
    tolerance: float = setting(0.0, min=0.0, help="relative rise of the loss that counts as rising")
    monitor: Literal[VALID_LOSS, TRAIN_LOSS] = setting(VALID_LOSS, help="the loss the feedback watches")


def grescale_phases(total_epochs: int, warmup_epochs: int, decay_epochs: int | None) -> tuple[int, int, int]:
    """GreScale's stage lengths ``(warmup, stabilisation, decay)`` in epochs (thesis 6.3.2): the warmup,
    then 4/7 and 3/7 of the remaining epochs (decay rounded to nearest) unless ``decay_epochs`` is given."""
    remaining = max(total_epochs - warmup_epochs, 0)
    decay = int(remaining * 3 / 7 + 0.5) if decay_epochs is None else decay_epochs
    if decay > remaining:
        raise ValueError(f"warmup_epochs ({warmup_epochs}) + decay_epochs ({decay}) exceed the {total_epochs} "
                         "training epochs")
    return min(warmup_epochs, total_epochs), remaining - decay, decay


@component("grescale", frameworks=("torch", "tensorflow"))
class GreScale(Warmup):
    """GreScale (thesis 6.3.2): adaptive warmup, feedback-adjusted reduced stabilisation (4/7), linear decay
    with a tunable coefficient (3/7)."""

    def __init__(self, config: Config, **run):
        super().__init__(config, **run)
        _, stab, self.decay_epochs = grescale_phases(self.total_epochs, self.warmup_epochs, config.decay_epochs)
        self.initial_warmup_epochs = self.warmup_epochs  # may exceed the run: the ramp is then cut short
        limit = self.total_epochs - self.decay_epochs
        self.max_warmup_epochs = config.max_warmup_epochs
        if self.max_warmup_epochs is None:
            self.max_warmup_epochs = max(min(self.warmup_epochs + stab // 2, limit), self.warmup_epochs)
        if self.warmup_epochs and not self.warmup_epochs <= self.max_warmup_epochs <= max(limit, self.warmup_epochs):
            raise ValueError(f"max_warmup_epochs ({self.max_warmup_epochs}) must lie between warmup_epochs "
                             f"({self.warmup_epochs}) and the start of the decay stage (epoch {limit})")
        self.decay_start = limit * self.steps_per_epoch
        self.decay_steps = self.decay_epochs * self.steps_per_epoch
        self.load_state_dict({"warmup_epochs": self.initial_warmup_epochs, "anchor_step": 0,
                              "anchor_lr": self.base_lr, "stabilisation_scale": config.stabilisation_scale,
                              "previous": None, "events": []})

    # --- feedback state (checkpointed) ---

    def state_dict(self) -> dict:
        """The feedback adjustments so far (a plain dict, saved in the trainer's checkpoints)."""
        return {"warmup_epochs": self.warmup_epochs, "anchor_step": self.anchor_step, "anchor_lr": self.anchor_lr,
                "stabilisation_scale": self.stabilisation_scale, "previous": self.previous,
                "events": [list(e) for e in self.events]}

    def load_state_dict(self, state: dict) -> None:
        missing = {"warmup_epochs", "anchor_step", "anchor_lr", "stabilisation_scale"} - set(state)
        if missing:
            raise ValueError(f"GreScale state lacks {', '.join(sorted(missing))}")
        self.warmup_epochs = int(state["warmup_epochs"])
        self.warmup_steps = self.warmup_epochs * self.steps_per_epoch
        self.anchor_step, self.anchor_lr = int(state["anchor_step"]), float(state["anchor_lr"])
        self.stabilisation_scale = float(state["stabilisation_scale"])
        self.previous = state.get("previous")
        self.events = [tuple(e) for e in state.get("events", [])]

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        """Feedback after epoch ``epoch`` (0-based): extend the warmup or lower the stabilisation lr
        when the monitored loss rose. The decay stage has a fixed schedule (no feedback)."""
        if not self.config.adaptive:
            return
        value = metrics.get(self.config.monitor, metrics.get(TRAIN_LOSS))
        if value is None:
            return
        value = float(value)
        rose = self.previous is not None and (
            not math.isfinite(value) or value > self.previous * (1 + self.config.tolerance))
        if math.isfinite(value):
            self.previous = value
        if not rose:
            return
        end = (epoch + 1) * self.steps_per_epoch
        if end > self.decay_start:
            return  # the decay stage follows its fixed schedule
        if epoch < self.warmup_epochs and self.warmup_epochs < self.max_warmup_epochs:
            # the ramp goes on from the epoch's last lr, reaching the target one epoch later
            self.anchor_step, self.anchor_lr = end - 1, self.rate(end - 1)
            self.warmup_epochs += 1
            self.warmup_steps = self.warmup_epochs * self.steps_per_epoch
            self.events.append((epoch, "warmup", self.warmup_epochs))
        else:  # a stabilisation epoch (or a warmup that may not grow any more): lower the stabilisation lr
            self.stabilisation_scale *= self.config.feedback_factor
            self.events.append((epoch, "stabilisation", self.stabilisation_scale))

    # --- schedule ---

    def rate(self, t: int) -> float:
        if t < self.warmup_steps:
            span = self.warmup_steps - self.anchor_step
            return self.anchor_lr + (self.target_lr - self.anchor_lr) * (t - self.anchor_step) / span
        stab = self.target_lr * self.stabilisation_scale
        if self.decay_steps == 0 or t < self.decay_start:
            return stab
        progress = min((t - self.decay_start + 1) / self.decay_steps, 1.0)
        return stab * max(1.0 - self.config.decay_coefficient * progress, 0.0)

    def stages(self) -> list[tuple[float, str]]:
        return [(self.warmup_epochs, "stabilisation"), (self.total_epochs - self.decay_epochs, "decay")]

    def describe(self) -> str:
        stab = self.total_epochs - self.warmup_epochs - self.decay_epochs
        text = (f"GreScale: {self._warmup_text()}; stabilisation for {max(stab, 0)} epoch(s) at x"
                f"{self.stabilisation_scale:g} of the target ({self.target_lr * self.stabilisation_scale:g}); "
                f"linear decay with coefficient {self.config.decay_coefficient:g} over the last {self.decay_epochs} "
                f"epoch(s)")
        if self.config.adaptive:
            text += (f"; adaptive on {self.config.monitor}: warmup up to {self.max_warmup_epochs} epoch(s), "
                     f"stabilisation lr x{self.config.feedback_factor:g} when the loss rises")
        return text
