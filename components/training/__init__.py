"""Training strategy components: learning-rate policies and checkpoints.

Only Config dataclasses and registry entries live here; the implementations
(``lr_policies``, ``checkpoints``) are imported when a generator is built, so the engine never
imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
    """GreScale (thesis 6.3.2); see ``lr_policies.GreScale``. Thesis defaults: 5-epoch warmup, then 4/7
    stabilisation and 3/7 decay of the remaining epochs (use with SGD and lr 1e-5, the defaults)."""

    warmup_epochs: int = field(default=5, metadata=_WARMUP)
    scale: bool = field(default=True, metadata=_SCALE)
    # stabilisation lr = target x this (reduced; lowered further by the feedback)
    stabilisation_scale: float = field(default=0.5, metadata={"gt": 0.0, "max": 1.0,
                                                               "aliases": ("stabilization_scale",)})
    # decay slope: lr = stabilisation lr x max(1 - coefficient x progress, 0); 0.9 ends at 1/10
    decay_coefficient: float = field(default=0.9, metadata={"gt": 0.0, "aliases": ("decay_slope",)})
    decay_epochs: int | None = field(default=None, metadata={"min": 0, "aliases": ("decay_period",)})
    adaptive: bool = True  # in-run feedback: extend the warmup, lower the stabilisation lr when the loss rises
    max_warmup_epochs: int | None = field(default=None, metadata={"min": 0})  # default: warmup + half the stabilisation
    feedback_factor: float = field(default=0.5, metadata={"gt": 0.0, "max": 0.999})
    tolerance: float = field(default=0.0, metadata={"min": 0.0})  # relative rise of the loss that counts
    monitor: Literal["valid_loss", "train_loss"] = "valid_loss"


LR_POLICIES.register("constant", f"{_LR}:Constant", None,
                     summary="the base learning rate on every step, not scaled with the number of ranks")
LR_POLICIES.register("linear_scaling", f"{_LR}:LinearScaling", LinearScalingConfig,
                     summary="linear scaling rule (Goyal et al.): lr = base lr x world size, no warmup")
LR_POLICIES.register("gradual_warmup", f"{_LR}:GradualWarmup", GradualWarmupConfig,
                     summary="linear scaling rule with a per-step gradual warmup from the base lr (Goyal et al.)")
LR_POLICIES.register("warmup_step_decay", f"{_LR}:WarmupStepDecay", WarmupStepDecayConfig,
                     summary="gradual warmup, then lr x decay at each milestone epoch (Goyal et al. 30,60,80)")
LR_POLICIES.register("grescale", f"{_LR}:GreScale", GreScaleConfig,
                     summary="GreScale (thesis 6.3.2): adaptive warmup, feedback-adjusted reduced stabilisation "
                             "(4/7), linear decay with a tunable coefficient (3/7)")


@dataclass
class PeriodicConfig:
    every_epochs: int = field(default=1, metadata={"min": 1, "aliases": ("every", "period", "frequency")})
    keep: int = field(default=2, metadata={"min": 1, "aliases": ("keep_last", "max_to_keep")})
    resume: bool = True


CHECKPOINTS.register("periodic", "autocnnp.components.training.checkpoints:Periodic", PeriodicConfig,
                     summary="atomic checkpoints every N epochs and at the end, keep the newest, resume, "
                             "with user plug-ins (on_epoch_end hooks)")
