"""The default generator tree: which extension points (action types) exist, in which module and
composite they sit, whether users may override them, and what data they hand each other."""

from __future__ import annotations

from dataclasses import dataclass

from . import registry as r


@dataclass(frozen=True)
class Point:
    """An action type of the generator tree."""

    type: str
    title: str
    module: str
    extensible: bool
    registry: r.Registry
    default: str | None
    aliases: tuple[str, ...] = ()
    consumes: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()


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
    Point("communication_init", "Communication Init", "train_env_def", False, r.COMMUNICATION, "torch_distributed",
          ("comm_init",), provides=("world",)),
    Point("device_placement", "Processes Device Placement", "train_env_def", False, r.PLACEMENT, "local_rank",
          consumes=("world",), provides=("device",)),
    Point("memory_allocation", "Memory Allocation", "train_env_def", False, r.MEMORY, "soft_placement",
          consumes=("device",)),
    Point("hyperparameters_injection", "Hyperparameters Injection", "train_strategy_def", False,
          r.HYPERPARAMETERS, "xml", ("hyperparameters",), provides=("hyperparameters",)),
    Point("dist_strategy", "Distributed Optimizer", "train_strategy_def", True, r.STRATEGIES, "ring_allreduce",
          ("distributed_optimizer",), consumes=("world", "device", "model", "hyperparameters"),
          provides=("parallel model", "optimizer")),
    Point("lr_policy", "Learning-Rate Policy", "train_strategy_def", True, r.LR_POLICIES, "gradual_warmup",
          ("lr_schedule",), consumes=("world", "hyperparameters", "optimizer")),
    Point("checkpoint", "Training Checkpoints", "train_strategy_def", True, r.CHECKPOINTS, "periodic",
          ("tr_checkpoint", "training_checkpoints"), consumes=("parallel model", "optimizer")),
    Point("task_definition", "Task Definition", "injection", False, r.TASKS, None, ("task",),
          provides=("task",)),
    Point("architecture_injection", "Architecture Injection", "injection", False, r.ARCHITECTURES, None,
          ("architecture",), consumes=("task",), provides=("model",)),
    Point("dataset_injection", "Dataset Injection", "injection", False, r.DATASETS, None, ("dataset",),
          consumes=("world", "task"), provides=("datasets",)),
)

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
