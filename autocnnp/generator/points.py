"""The generator tree: which extension points (action types) exist, in which module and composite
they sit, whether users may override them, what data they hand each other, and how their
implementations are called. This table is the one place that knows them.

===========================  ====================================================================
point                        implementation (``config``: the bound Config, first when declared)
===========================  ====================================================================
framework                    ``Framework(config)``: protocols.Framework (builds and trains a rank's run)
communication_init           ``init(config, timeout_s=) -> World``
device_placement             ``place(world=) -> device`` (a torch.device; a TensorFlow device name)
memory_allocation            ``apply(config, device=) -> device``
hyperparameters_injection    ``inject(config) -> the bound hyperparameters``
dist_strategy                ``Strategy(config, world=, device=, beat=)``: protocols.Strategy
lr_policy                    ``Policy(config, base_lr=, replicas=, steps_per_epoch=, total_epochs=)``:
                             protocols.LRPolicy
checkpoint                   ``Checkpointer(config, directory=, rank=, plugins=)``: protocols.Checkpointer
task_definition              ``Task()`` with ``loss(name)`` and ``evaluator(num_classes, class_names, regions)``
architecture_injection       ``build(config, in_channels=, num_classes=) -> nn.Module`` (a keras.Model on
                             tensorflow); the input sizes it takes: protocols.SizeRule
dataset_injection            ``Format(config)``: protocols.DataFormat
===========================  ====================================================================

A user callable without a Config gets its parameters as keyword arguments instead.

Every built-in declares the frameworks it trains with (``@component(..., frameworks=)``, torch unless
it says); one name may have an implementation per framework (``ring_allreduce`` is DDP on torch and
MultiWorkerMirroredStrategy on tensorflow), so a job swaps framework by its framework action alone.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field

from .protocols import Checkpointer, DataFormat, Framework, KerasStrategy, LRPolicy, Strategy
from .registry import Fits, Registry


@dataclass(frozen=True)
class Point:
    """An action type of the generator tree."""

    type: str
    title: str
    module: str
    extensible: bool
    folder: str  # autocnnp/components/<folder>/ holds its built-ins
    default: str | None
    file_entry: str  # the symbol a user file defines by convention
    fits: Fits = Fits()
    aliases: tuple[str, ...] = ()
    consumes: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    noun: str = ""  # what messages call an implementation (and the entry-point group autocnnp.<noun>); default: type
    # (framework, base class) of protocols.py an implementation is seen through ("": any framework)
    protocols: tuple[tuple[str, builtins.type], ...] = ()  # builtins: the field `type` shadows it here
    registry: Registry = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "registry", Registry(self.noun or self.type, self.folder, self.file_entry, self.fits))

    def protocol(self, framework: str) -> builtins.type | None:
        """The base class an implementation of this point is for ``framework`` (None: no protocol class)."""
        return next((base for name, base in self.protocols if name in ("", framework)), None)


@dataclass(frozen=True)
class ModuleDef:
    name: str
    title: str
    composite: str
    aliases: tuple[str, ...] = ()


COMPOSITES = {
    "parallelism_definition": "Parallelism Definition",
    "model_definition": "Model Definition",
}

MODULES = (
    ModuleDef("train_env_def", "Training Environment Definition", "parallelism_definition"),
    # "train_srategy_def" is the spelling of the published job file (thesis Listing 4.1).
    ModuleDef("train_strategy_def", "Training Strategy Tuning", "parallelism_definition", ("train_srategy_def",)),
    ModuleDef("injection", "Injection", "model_definition", ("model_injection",)),
)

POINTS = (
    Point("framework", "Training Framework", "train_env_def", False, "frameworks", "torch", "Framework",
          provides=("framework",), protocols=(("", Framework),)),
    Point("communication_init", "Communication Init", "train_env_def", False, "communication", "torch_distributed",
          "init", aliases=("comm_init",), provides=("world",)),
    Point("device_placement", "Processes Device Placement", "train_env_def", False, "placement", "local_rank",
          "place", consumes=("world",), provides=("device",)),
    Point("memory_allocation", "Memory Allocation", "train_env_def", False, "memory", "soft_placement", "apply",
          consumes=("device",)),
    Point("hyperparameters_injection", "Hyperparameters Injection", "train_strategy_def", False, "hyperparameters",
          "xml", "inject", aliases=("hyperparameters",), provides=("hyperparameters",)),
    Point("dist_strategy", "Distributed Optimizer", "train_strategy_def", True, "strategies", "ring_allreduce",
          "Strategy", Fits(bases=("Strategy", "KerasStrategy"), methods=("wrap", "sampler")), ("distributed_optimizer",),
          consumes=("world", "device", "model", "hyperparameters"), provides=("parallel model", "optimizer"),
          protocols=(("tensorflow", KerasStrategy), ("", Strategy))),
    Point("lr_policy", "Learning-Rate Policy", "train_strategy_def", True, "lr_policies", "gradual_warmup",
          "Policy", Fits(bases=("LRPolicy",), methods=("lr",)), ("lr_schedule",),
          consumes=("world", "hyperparameters", "optimizer"), protocols=(("", LRPolicy),)),
    Point("checkpoint", "Training Checkpoints", "train_strategy_def", True, "checkpoints", "periodic",
          "Checkpointer", Fits(bases=("Checkpointer",), methods=("save", "load")),
          ("tr_checkpoint", "training_checkpoints"), consumes=("parallel model", "optimizer"),
          protocols=(("", Checkpointer),)),
    Point("task_definition", "Task Definition", "injection", False, "tasks", None, "Task", aliases=("task",),
          provides=("task",)),
    Point("architecture_injection", "Architecture Injection", "injection", False, "architectures", None, "build",
          Fits(bases=("Module", "Model"), methods=("forward",)), ("architecture",), consumes=("task",),
          provides=("model",), noun="architecture"),
    Point("dataset_injection", "Dataset Injection", "injection", False, "datasets", "decathlon", "Format",
          aliases=("dataset",), consumes=("world", "task"), provides=("datasets",), noun="dataset",
          protocols=(("", DataFormat),)),
)

# Trackers (<monitoring> tracker, several at once) are no action of the generator tree: a registry of their own.
TRACKERS = Registry("tracker", "trackers", "Tracker", Fits(bases=("Tracker",), methods=("epoch_end",)))

# What a checkpoint plug-in file may define (<value name="X"><path>f.py</path></value>).
PLUGIN_FITS = Fits(bases=("CheckpointPlugin",), methods=("on_epoch_end",), functions=True)

# Points whose implementation is chosen by another part of the job file, not by an <action>.
SET_ELSEWHERE = {
    "task_definition": '<task name="...">',
    "architecture_injection": "<CNN_archi>",
    "dataset_injection": '<data format="...">',
    "hyperparameters_injection": "<hyperparameters>",
}


def _index():
    out = {}
    for p in POINTS:
        for key in (p.type, *p.aliases):
            out[key.lower()] = p
    return out


POINT_BY_NAME = _index()
MODULE_BY_NAME = {key.lower(): m for m in MODULES for key in (m.name, *m.aliases)}


def registry(point_type: str) -> Registry:
    """The registry of one extension point."""
    return POINT_BY_NAME[point_type].registry
