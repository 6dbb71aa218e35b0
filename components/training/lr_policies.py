"""Learning-rate policies for data-parallel training (the ``lr_policy`` extension point).

A policy only computes numbers (no torch). The trainer builds one per run as::

    Policy(base_lr=..., world_size=..., steps_per_epoch=..., total_epochs=..., **config_fields)

and asks ``policy.lr(epoch, step)`` before every optimiser step (``epoch`` and ``step`` are
0-based; ``step`` is the index of the mini-batch inside the epoch). The answer is a pure function
of ``(epoch, step)``, so a resumed run gets the right learning rate without saving any state.

Policies (Goyal et al., "Accurate, Large Minibatch SGD", 2017, and the thesis, chapters 3 and 6):

``constant``           ``base_lr`` whatever the number of ranks.
``linear_scaling``     ``base_lr x world_size`` (linear scaling rule), no warmup.
``gradual_warmup``     ramps per step from ``base_lr`` to ``base_lr x world_size`` over the first
                       ``warmup_epochs`` epochs, then constant.
``warmup_step_decay``  gradual warmup, then multiplied by ``decay`` at each epoch of ``milestones``.
``grescale``           the thesis' GreScale rule (section 6.3.2): warmup, stabilisation, then a
                       linear decay over the last 3/7 of the post-warmup epochs.
"""

from __future__ import annotations

import math
import re
from numbers import Integral, Real


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be a whole number, not {value!r}")
    if value < minimum:
        raise ValueError(f"{name} is {value}, it must be at least {minimum}")
    return int(value)


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number greater than 0, not {value!r}")
    return float(value)


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, not {value!r}")
    return value


def parse_milestones(milestones, warmup_epochs: int = 0) -> tuple[int, ...]:
    """``"30,60,80"`` (commas, semicolons or spaces) or a sequence of ints -> ``(30, 60, 80)``.

    Milestones are epochs (0-based: the decay applies from the first step of that epoch on), must
    be strictly increasing and may not fall inside the warmup.
    """
    if isinstance(milestones, str):
        parts = [p for p in re.split(r"[,;\s]+", milestones.strip()) if p]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"milestones must be whole epoch numbers separated by commas, such as "
                             f"'30,60,80', not {milestones!r}") from None
    else:
        values = [_int("milestone", m, 0) for m in milestones]
    for m in values:
        if m < 1:
            raise ValueError(f"milestone {m} is not a valid epoch: milestones must be at least 1")
    for a, b in zip(values, values[1:]):
        if b <= a:
            raise ValueError(f"milestones must be strictly increasing, but {b} follows {a}")
    inside = [m for m in values if m < warmup_epochs]
    if inside:
        raise ValueError(f"milestone {inside[0]} falls inside the warmup (warmup_epochs={warmup_epochs}); "
                         "decay epochs must come at or after the end of the warmup")
    return tuple(values)


class _Policy:
    """Common validation and helpers; subclasses implement ``_lr(global_step)``."""

    name = "policy"

    def __init__(self, *, base_lr: float, world_size: int, steps_per_epoch: int, total_epochs: int):
        self.base_lr = _positive("base_lr", base_lr)
        self.world_size = _int("world_size", world_size, 1)
        self.steps_per_epoch = _int("steps_per_epoch", steps_per_epoch, 1)
        self.total_epochs = _int("total_epochs", total_epochs, 1)
        self.target_lr = self.base_lr

    def lr(self, epoch: int, step: int) -> float:
        """The learning rate for mini-batch ``step`` (0-based) of epoch ``epoch`` (0-based)."""
        epoch = _int("epoch", epoch, 0)
        step = _int("step", step, 0)
        if step >= self.steps_per_epoch:
            raise ValueError(f"step {step} is outside the epoch: steps are 0..{self.steps_per_epoch - 1} "
                             f"(steps_per_epoch={self.steps_per_epoch})")
        return float(self._lr(epoch * self.steps_per_epoch + step))

    def _lr(self, t: int) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.describe()}>"


class _Warmup(_Policy):
    """Linear per-step ramp from ``base_lr`` to ``target_lr`` over ``warmup_epochs`` epochs."""

    def __init__(self, *, base_lr, world_size, steps_per_epoch, total_epochs, warmup_epochs=5, scale=True):
        super().__init__(base_lr=base_lr, world_size=world_size, steps_per_epoch=steps_per_epoch,
                         total_epochs=total_epochs)
        self.warmup_epochs = _int("warmup_epochs", warmup_epochs, 0)
        self.scale = _bool("scale", scale)
        self.target_lr = self.base_lr * (self.world_size if self.scale else 1)
        self.warmup_steps = self.warmup_epochs * self.steps_per_epoch

    def _warm(self, t: int) -> float:
        if t >= self.warmup_steps:
            return self.target_lr
        return self.base_lr + (self.target_lr - self.base_lr) * t / self.warmup_steps

    def _warmup_text(self) -> str:
        scaled = (f"base_lr {self.base_lr:g} x {self.world_size} ranks = {self.target_lr:g} (linear scaling rule)"
                  if self.scale else f"{self.target_lr:g} (no scaling)")
        if self.warmup_epochs == 0:
            return f"lr {scaled}, no warmup"
        text = (f"lr ramps linearly per step from {self.base_lr:g} to {scaled} over {self.warmup_epochs} "
                f"epoch(s) ({self.warmup_steps} steps)")
        if self.warmup_epochs >= self.total_epochs:
            text += f" [the run has only {self.total_epochs} epoch(s): the target lr is never reached]"
        return text


class Constant(_Policy):
    """The same learning rate on every step, whatever the number of ranks."""

    name = "constant"

    def _lr(self, t):
        return self.base_lr

    def describe(self) -> str:
        return f"constant lr {self.base_lr:g} (not scaled with the {self.world_size} ranks)"


class LinearScaling(_Policy):
    """Linear scaling rule (Goyal et al.): lr = base_lr x world size, from the first step."""

    name = "linear_scaling"

    def __init__(self, *, base_lr, world_size, steps_per_epoch, total_epochs, scale=True):
        super().__init__(base_lr=base_lr, world_size=world_size, steps_per_epoch=steps_per_epoch,
                         total_epochs=total_epochs)
        self.scale = _bool("scale", scale)
        self.target_lr = self.base_lr * (self.world_size if self.scale else 1)

    def _lr(self, t):
        return self.target_lr

    def describe(self) -> str:
        if not self.scale:
            return f"constant lr {self.target_lr:g} (scaling switched off)"
        return (f"linear scaling rule: lr = base_lr {self.base_lr:g} x {self.world_size} ranks = "
                f"{self.target_lr:g}, no warmup")


class GradualWarmup(_Warmup):
    """Linear scaling rule with gradual warmup (Goyal et al.), then constant."""

    name = "gradual_warmup"

    def _lr(self, t):
        return self._warm(t)

    def describe(self) -> str:
        return f"gradual warmup: {self._warmup_text()}, then constant"


class WarmupStepDecay(_Warmup):
    """Gradual warmup, then the lr is multiplied by ``decay`` at each milestone epoch."""

    name = "warmup_step_decay"

    def __init__(self, *, base_lr, world_size, steps_per_epoch, total_epochs, warmup_epochs=5, scale=True,
                 milestones="30,60,80", decay=0.1):
        super().__init__(base_lr=base_lr, world_size=world_size, steps_per_epoch=steps_per_epoch,
                         total_epochs=total_epochs, warmup_epochs=warmup_epochs, scale=scale)
        self.milestones = parse_milestones(milestones, self.warmup_epochs)
        self.decay = _positive("decay", decay)

    def _lr(self, t):
        epoch = t // self.steps_per_epoch
        passed = sum(1 for m in self.milestones if m <= epoch)
        return self._warm(t) * self.decay ** passed

    def describe(self) -> str:
        text = f"warmup + step decay: {self._warmup_text()}, then x{self.decay:g} at epoch(s) " + (
            ", ".join(map(str, self.milestones)) if self.milestones else "(none)")
        late = [m for m in self.milestones if m >= self.total_epochs]
        if late:
            text += f" [milestone(s) {', '.join(map(str, late))} lie beyond the {self.total_epochs}-epoch run]"
        return text


class GreScale(_Warmup):
    """GreScale (thesis 6.3.2): warmup, stabilisation at the target lr, then linear decay.

    Phases: ``warmup_epochs`` of gradual warmup; stabilisation at the target lr; decay over the last
    ``decay_epochs`` epochs (default: 3/7 of the epochs after the warmup, rounded), in which the lr
    falls linearly per step from the target to ``target x decay`` (reached at the end of the run).
    The guideline tunes base_lr, decay, warmup_epochs and decay_epochs from run to run.
    """

    name = "grescale"

    def __init__(self, *, base_lr, world_size, steps_per_epoch, total_epochs, warmup_epochs=5, scale=True,
                 decay=0.1, decay_epochs=None):
        super().__init__(base_lr=base_lr, world_size=world_size, steps_per_epoch=steps_per_epoch,
                         total_epochs=total_epochs, warmup_epochs=warmup_epochs, scale=scale)
        self.decay = _positive("decay", decay)
        remaining = max(self.total_epochs - self.warmup_epochs, 0)
        if decay_epochs is None:
            decay_epochs = int(remaining * 3 / 7 + 0.5)
        self.decay_epochs = _int("decay_epochs", decay_epochs, 0)
        if self.decay_epochs > remaining:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) + decay_epochs ({self.decay_epochs}) exceed "
                             f"the {self.total_epochs} training epochs")
        self.decay_start = (self.total_epochs - self.decay_epochs) * self.steps_per_epoch
        self.decay_steps = self.decay_epochs * self.steps_per_epoch

    def _lr(self, t):
        if self.decay_steps == 0 or t < self.decay_start:
            return self._warm(t)
        progress = min((t - self.decay_start + 1) / self.decay_steps, 1.0)
        return self.target_lr * (1.0 - (1.0 - self.decay) * progress)

    def describe(self) -> str:
        stab = self.total_epochs - self.warmup_epochs - self.decay_epochs
        return (f"GreScale: {self._warmup_text()}; stabilisation for {max(stab, 0)} epoch(s); linear decay to "
                f"x{self.decay:g} ({self.target_lr * self.decay:g}) over the last {self.decay_epochs} epoch(s)")


def schedule(policy, total_epochs: int, steps_per_epoch: int) -> list[tuple[float, float]]:
    """``(epoch + step / steps_per_epoch, lr)`` for every step of the run, for plotting."""
    total_epochs = _int("total_epochs", total_epochs, 0)
    steps_per_epoch = _int("steps_per_epoch", steps_per_epoch, 1)
    return [(epoch + step / steps_per_epoch, float(policy.lr(epoch, step)))
            for epoch in range(total_epochs) for step in range(steps_per_epoch)]
