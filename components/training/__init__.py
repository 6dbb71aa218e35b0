"""Training strategy components: learning-rate policies and checkpoints.

Only Config dataclasses and registry entries live here; the implementations
(``lr_policies``, ``checkpoints``) are imported when a generator is built, so the engine never
imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from autocnnp.generator.registry import CHECKPOINTS, LR_POLICIES

_LR = "autocnnp.components.training.lr_policies"
_SCALE = {"aliases": ("linear_scaling", "scaling")}
_WARMUP = {"min": 0, "aliases": ("warmup", "warmup_period")}
_DECAY = {"aliases": ("gamma", "decay_factor", "decay_coefficient")}


def _check_decay(decay: float) -> None:
    if not decay > 0:
        raise ValueError(f"decay must be greater than 0, not {decay}")


@dataclass
class LinearScalingConfig:
    scale: bool = field(default=True, metadata=_SCALE)  # lr = base lr x world size


@dataclass
class GradualWarmupConfig:
    warmup_epochs: int = field(default=5, metadata=_WARMUP)
    scale: bool = field(default=True, metadata=_SCALE)  # linear scaling rule: target lr = base lr x world size


@dataclass
class WarmupStepDecayConfig:
    warmup_epochs: int = field(default=5, metadata=_WARMUP)
    scale: bool = field(default=True, metadata=_SCALE)
    milestones: str = field(default="30,60,80", metadata={"aliases": ("decay_at",)})
    decay: float = field(default=0.1, metadata=_DECAY)

    def __post_init__(self):
        from .lr_policies import parse_milestones  # torch-free

        parse_milestones(self.milestones, self.warmup_epochs)
        _check_decay(self.decay)


@dataclass
class GreScaleConfig:
    warmup_epochs: int = field(default=5, metadata=_WARMUP)
    scale: bool = field(default=True, metadata=_SCALE)
    decay: float = field(default=0.1, metadata=_DECAY)  # lr at the end of the run = target x decay
    decay_epochs: int | None = field(default=None, metadata={"min": 0, "aliases": ("decay_period",)})

    def __post_init__(self):
        _check_decay(self.decay)


LR_POLICIES.register("constant", f"{_LR}:Constant", None,
                     summary="the base learning rate on every step, not scaled with the number of ranks")
LR_POLICIES.register("linear_scaling", f"{_LR}:LinearScaling", LinearScalingConfig,
                     summary="linear scaling rule (Goyal et al.): lr = base lr x world size, no warmup")
LR_POLICIES.register("gradual_warmup", f"{_LR}:GradualWarmup", GradualWarmupConfig,
                     summary="linear scaling rule with a per-step gradual warmup from the base lr (Goyal et al.)")
LR_POLICIES.register("warmup_step_decay", f"{_LR}:WarmupStepDecay", WarmupStepDecayConfig,
                     summary="gradual warmup, then lr x decay at each milestone epoch (Goyal et al. 30,60,80)")
LR_POLICIES.register("grescale", f"{_LR}:GreScale", GreScaleConfig,
                     summary="GreScale (thesis 6.3.2): warmup, stabilisation, linear decay over the last 3/7")


@dataclass
class PeriodicConfig:
    every_epochs: int = field(default=1, metadata={"min": 1, "aliases": ("every", "period", "frequency")})
    keep: int = field(default=2, metadata={"min": 1, "aliases": ("keep_last", "max_to_keep")})
    resume: bool = True


CHECKPOINTS.register("periodic", "autocnnp.components.training.checkpoints:Periodic", PeriodicConfig,
                     summary="atomic checkpoints every N epochs and at the end, keep the newest, resume, "
                             "with user plug-ins (on_epoch_end hooks)")
