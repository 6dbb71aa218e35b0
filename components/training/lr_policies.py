"""Learning-rate policies for data-parallel training (the ``lr_policy`` extension point).

A policy only computes numbers (no torch). The trainer builds one per run as::

    Policy(base_lr=..., world_size=..., steps_per_epoch=..., total_epochs=..., **config_fields)

and asks ``policy.lr(epoch, step)`` before every optimiser step (``epoch`` and ``step`` are
0-based; ``step`` is the index of the mini-batch inside the epoch). The answer is a pure function
of ``(epoch, step)``, so a resumed run gets the right learning rate without saving any state --
except for a policy with feedback (GreScale): the trainer calls its optional
``on_epoch_end(epoch, metrics)`` after every epoch and saves its ``state_dict()`` in checkpoints.

Policies (Goyal et al., "Accurate, Large Minibatch SGD", 2017, and the thesis, chapters 3 and 6):

``constant``           ``base_lr`` whatever the number of ranks.
``linear_scaling``     ``base_lr x world_size`` (linear scaling rule), no warmup.
``gradual_warmup``     ramps per step from ``base_lr`` to ``base_lr x world_size`` over the first
                       ``warmup_epochs`` epochs, then constant.
``warmup_step_decay``  gradual warmup, then multiplied by ``decay`` at each epoch of ``milestones``.
``grescale``           the thesis' GreScale rule (section 6.3.2): adaptive warmup, feedback-adjusted
                       stabilisation at a reduced lr (4/7 of the post-warmup epochs), linear decay
                       with an adjustable coefficient (3/7). Its feedback (``on_epoch_end``) and
                       ``state_dict``/``load_state_dict`` are optional policy hooks the trainer calls.
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


def grescale_phases(total_epochs: int, warmup_epochs: int = 5, decay_epochs: int | None = None) -> tuple[int, int, int]:
    """GreScale's default stage lengths ``(warmup, stabilisation, decay)`` in epochs (thesis 6.3.2):
    ``warmup_epochs`` (5), then 4/7 and 3/7 of the remaining epochs (decay rounded to nearest)."""
    total_epochs = _int("total_epochs", total_epochs, 1)
    warmup_epochs = _int("warmup_epochs", warmup_epochs, 0)
    remaining = max(total_epochs - warmup_epochs, 0)
    decay = int(remaining * 3 / 7 + 0.5) if decay_epochs is None else _int("decay_epochs", decay_epochs, 0)
    if decay > remaining:
        raise ValueError(f"warmup_epochs ({warmup_epochs}) + decay_epochs ({decay}) exceed the {total_epochs} "
                         "training epochs")
    return min(warmup_epochs, total_epochs), remaining - decay, decay


class GreScale(_Warmup):
    """GreScale (thesis 6.3.2): adaptive warmup, feedback-adjusted stabilisation, linear decay.

    1. **Warmup** (``warmup_epochs``, default 5): per step from ``base_lr`` to the linear-scaling target
       ``base_lr x world_size``. *Adaptive*: when the monitored loss rises at the end of a warmup epoch
       (the instability of thesis Figure 6.1), the warmup is extended by one epoch (up to
       ``max_warmup_epochs``) and the ramp continues from the current lr at a gentler slope. The epoch
       is taken from the stabilisation stage: warmup and stabilisation are interchangeable, the decay
       stage keeps its length.
    2. **Stabilisation** (4/7 of the epochs after the default warmup): a reduced lr,
       ``target x stabilisation_scale``. *Feedback-adjusted*: each stabilisation epoch whose monitored
       loss rises multiplies that lr by ``feedback_factor``.
    3. **Decay** (``decay_epochs``, default 3/7 of the epochs after the warmup): linear per step from the
       stabilisation lr with slope ``decay_coefficient``: after a fraction p of the stage the lr is
       ``stabilisation lr x max(1 - decay_coefficient x p, 0)``. The default 0.9 ends at 1/10 of it
       (as Goyal et al.'s x0.1); a larger coefficient decays faster (from 1 on the lr reaches 0 before
       the end).

    "Rises" means ``loss > previous x (1 + tolerance)`` or a non-finite loss. The trainer reports each
    epoch's metrics through :meth:`on_epoch_end` (identical on every rank: they are all-reduced) and
    checkpoints :meth:`state_dict`, so a resumed run continues with the adjusted schedule. With
    ``adaptive=False`` the schedule is a pure function of (epoch, step). Across runs the guideline
    (``autocnnp tune``) tunes ``base_lr``, ``decay_coefficient``, ``warmup_epochs``, ``decay_epochs``.
    """

    name = "grescale"
    MONITORS = ("valid_loss", "train_loss")

    def __init__(self, *, base_lr, world_size, steps_per_epoch, total_epochs, warmup_epochs=5, scale=True,
                 stabilisation_scale=0.5, decay_coefficient=0.9, decay_epochs=None, adaptive=True,
                 max_warmup_epochs=None, feedback_factor=0.5, tolerance=0.0, monitor="valid_loss"):
        super().__init__(base_lr=base_lr, world_size=world_size, steps_per_epoch=steps_per_epoch,
                         total_epochs=total_epochs, warmup_epochs=warmup_epochs, scale=scale)
        _, stab, self.decay_epochs = grescale_phases(self.total_epochs, self.warmup_epochs, decay_epochs)
        self.initial_warmup_epochs = self.warmup_epochs  # may exceed the run: the ramp is then cut short
        self.stabilisation_scale0 = _positive("stabilisation_scale", stabilisation_scale)
        if self.stabilisation_scale0 > 1:
            raise ValueError(f"stabilisation_scale is {stabilisation_scale}: the stabilisation lr is a fraction "
                             "(0 < scale <= 1) of the target lr")
        self.decay_coefficient = _positive("decay_coefficient", decay_coefficient)
        self.adaptive = _bool("adaptive", adaptive)
        self.feedback_factor = _positive("feedback_factor", feedback_factor)
        if self.feedback_factor >= 1:
            raise ValueError(f"feedback_factor is {feedback_factor}: it must lower the lr (0 < factor < 1)")
        if isinstance(tolerance, bool) or not isinstance(tolerance, Real) or not 0 <= tolerance < math.inf:
            raise ValueError(f"tolerance must be a number of at least 0, not {tolerance!r}")
        self.tolerance = float(tolerance)
        if monitor not in self.MONITORS:
            raise ValueError(f"monitor must be one of {', '.join(self.MONITORS)}, not {monitor!r}")
        self.monitor = monitor
        limit = self.total_epochs - self.decay_epochs
        if max_warmup_epochs is None:
            max_warmup_epochs = max(min(self.warmup_epochs + stab // 2, limit), self.warmup_epochs)
        self.max_warmup_epochs = _int("max_warmup_epochs", max_warmup_epochs, 0)
        if self.warmup_epochs and not self.warmup_epochs <= self.max_warmup_epochs <= max(limit, self.warmup_epochs):
            raise ValueError(f"max_warmup_epochs ({self.max_warmup_epochs}) must lie between warmup_epochs "
                             f"({self.warmup_epochs}) and the start of the decay stage (epoch {limit})")
        self.decay_start = limit * self.steps_per_epoch
        self.decay_steps = self.decay_epochs * self.steps_per_epoch
        self.load_state_dict(self._initial_state())

    # --- feedback state (checkpointed) ---
    def _initial_state(self) -> dict:
        return {"warmup_epochs": self.initial_warmup_epochs, "anchor_step": 0, "anchor_lr": self.base_lr,
                "stabilisation_scale": self.stabilisation_scale0, "previous": None, "events": []}

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
        if not self.adaptive:
            return
        value = metrics.get(self.monitor, metrics.get("train_loss"))
        if value is None:
            return
        value = float(value)
        rose = self.previous is not None and (not math.isfinite(value) or value > self.previous * (1 + self.tolerance))
        if math.isfinite(value):
            self.previous = value
        if not rose:
            return
        end = (epoch + 1) * self.steps_per_epoch
        if end > self.decay_start:
            return  # the decay stage follows its fixed schedule
        if epoch < self.warmup_epochs and self.warmup_epochs < self.max_warmup_epochs:
            # the ramp goes on from the epoch's last lr, reaching the target one epoch later
            self.anchor_step, self.anchor_lr = end - 1, self._lr(end - 1)
            self.warmup_epochs += 1
            self.warmup_steps = self.warmup_epochs * self.steps_per_epoch
            self.events.append((epoch, "warmup", self.warmup_epochs))
        else:  # a stabilisation epoch (or a warmup that may not grow any more): lower the stabilisation lr
            self.stabilisation_scale *= self.feedback_factor
            self.events.append((epoch, "stabilisation", self.stabilisation_scale))

    # --- schedule ---
    def _lr(self, t):
        if t < self.warmup_steps:
            span = self.warmup_steps - self.anchor_step
            return self.anchor_lr + (self.target_lr - self.anchor_lr) * (t - self.anchor_step) / span
        stab = self.target_lr * self.stabilisation_scale
        if self.decay_steps == 0 or t < self.decay_start:
            return stab
        progress = min((t - self.decay_start + 1) / self.decay_steps, 1.0)
        return stab * max(1.0 - self.decay_coefficient * progress, 0.0)

    def describe(self) -> str:
        stab = self.total_epochs - self.warmup_epochs - self.decay_epochs
        text = (f"GreScale: {self._warmup_text()}; stabilisation for {max(stab, 0)} epoch(s) at x"
                f"{self.stabilisation_scale:g} of the target ({self.target_lr * self.stabilisation_scale:g}); "
                f"linear decay with coefficient {self.decay_coefficient:g} over the last {self.decay_epochs} "
                f"epoch(s)")
        if self.adaptive:
            text += (f"; adaptive on {self.monitor}: warmup up to {self.max_warmup_epochs} epoch(s), stabilisation "
                     f"lr x{self.feedback_factor:g} when the loss rises")
        return text


def schedule(policy, total_epochs: int, steps_per_epoch: int) -> list[tuple[float, float]]:
    """``(epoch + step / steps_per_epoch, lr)`` for every step of the run, for plotting."""
    total_epochs = _int("total_epochs", total_epochs, 0)
    steps_per_epoch = _int("steps_per_epoch", steps_per_epoch, 1)
    return [(epoch + step / steps_per_epoch, float(policy.lr(epoch, step)))
            for epoch in range(total_epochs) for step in range(steps_per_epoch)]
