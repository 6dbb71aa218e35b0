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
    Point(type="framework", title="Training Framework", module="train_env_def", extensible=False, folder="frameworks",
          default="torch", file_entry="Framework", provides=("framework",), protocols=(("", Framework),)),
    Point(type="communication_init", title="Communication Init", module="train_env_def", extensible=False,
          folder="communication", default="torch_distributed", file_entry="init", aliases=("comm_init",),
          provides=("world",)),
    Point(type="device_placement", title="Processes Device Placement", module="train_env_def", extensible=False,
          folder="placement", default="local_rank", file_entry="place", consumes=("world",), provides=("device",)),
    Point(type="memory_allocation", title="Memory Allocation", module="train_env_def", extensible=False,
          folder="memory", default="soft_placement", file_entry="apply", consumes=("device",)),
    Point(type="hyperparameters_injection", title="Hyperparameters Injection", module="train_strategy_def",
          extensible=False, folder="hyperparameters", default="xml", file_entry="inject", aliases=("hyperparameters",),
          provides=("hyperparameters",)),
    Point(type="dist_strategy", title="Distributed Optimizer", module="train_strategy_def", extensible=True,
          folder="strategies", default="ring_allreduce", file_entry="Strategy",
          fits=Fits(bases=("Strategy", "KerasStrategy"), methods=("wrap", "sampler")),
          aliases=("distributed_optimizer",), consumes=("world", "device", "model", "hyperparameters"),
          provides=("parallel model", "optimizer"), protocols=(("tensorflow", KerasStrategy), ("", Strategy))),
    Point(type="lr_policy", title="Learning-Rate Policy", module="train_strategy_def", extensible=True,
          folder="lr_policies", default="gradual_warmup", file_entry="Policy",
          fits=Fits(bases=("LRPolicy",), methods=("lr",)), aliases=("lr_schedule",),
          consumes=("world", "hyperparameters", "optimizer"), protocols=(("", LRPolicy),)),
    Point(type="checkpoint", title="Training Checkpoints", module="train_strategy_def", extensible=True,
          folder="checkpoints", default="periodic", file_entry="Checkpointer",
          fits=Fits(bases=("Checkpointer",), methods=("save", "load")),
          aliases=("tr_checkpoint", "training_checkpoints"), consumes=("parallel model", "optimizer"),
          protocols=(("", Checkpointer),)),
    Point(type="task_definition", title="Task Definition", module="injection", extensible=False, folder="tasks",
          default=None, file_entry="Task", aliases=("task",), provides=("task",)),
    Point(type="architecture_injection", title="Architecture Injection", module="injection", extensible=False,
          folder="architectures", default=None, file_entry="build",
          fits=Fits(bases=("Module", "Model"), methods=("forward",)), aliases=("architecture",), consumes=("task",),
          provides=("model",), noun="architecture"),
    Point(type="dataset_injection", title="Dataset Injection", module="injection", extensible=False, folder="datasets",
          default="decathlon", file_entry="Format", aliases=("dataset",), consumes=("world", "task"),
          provides=("datasets",), noun="dataset", protocols=(("", DataFormat),)),
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
