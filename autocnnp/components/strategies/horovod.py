"""Horovod's distributed optimizer: synchronous data parallelism, gradients averaged by Horovod's
allreduce (MPI or Gloo controller) while the backward pass runs.

Needs communication_init ``horovod`` (the engine picks it) and an installed Horovod: ``make horovod``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from autocnnp.components.communication.horovod_world import import_horovod
from autocnnp.core.settings import setting
from autocnnp.generator.protocols import MPI_LAUNCHERS, Strategy, StrategyConfig, collective_wait, shard_sampler
from autocnnp.generator.registry import component


@dataclass
class Config(StrategyConfig):
    compression: Literal["none", "fp16"] = setting("none", help="gradients sent as fp16 halves the traffic")

    def refuses_virtual_ranks(self) -> str | None:
        return "Horovod's DistributedOptimizer exchanges the gradients in each backward and refuses a second before the step"


@component("horovod")
class Horovod(Strategy):
    """Horovod DistributedOptimizer: gradients allreduce-averaged during backward (MPI or Gloo controller).

    Parameters are broadcast from rank 0 at wrap time; each gradient is allreduce-averaged as soon as
    backward produces it; each rank reads its own shard of Horovod's rank and size. ``make horovod``
    installs Horovod."""

    requires = {"communication_init": ("horovod",)}
    launchers = MPI_LAUNCHERS

    def __init__(self, config: Config, **runtime):
        super().__init__(config, **runtime)
        self.hvd = import_horovod()
        if not self.hvd.is_initialized():
            raise RuntimeError("dist_strategy 'horovod' needs communication_init 'horovod' (hvd.init()); "
                               "remove the job's communication_init action to let the engine choose it")
        if self.device.type == "cuda" and not self.hvd.cuda_built():
            raise RuntimeError("this Horovod was built without GPU operations (`make horovod` builds the CPU "
                               "version): use device_placement cpu, or rebuild Horovod with "
                               "HOROVOD_GPU_OPERATIONS=NCCL")
        self.compression = {"none": self.hvd.Compression.none, "fp16": self.hvd.Compression.fp16}[config.compression]

    def wrap(self, model: nn.Module) -> nn.Module:
        """Move to the device and give every rank rank 0's parameters and buffers."""
        model = model.to(self.device)
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        # Horovod's broadcast_optimizer_state initialises an empty state with one zero-gradient step,
        # which applies weight decay once and counts an Adam step: a fresh optimizer (the same on every
        # rank, built from the same hyperparameters) has nothing to broadcast, so only a filled one is.
        if optimizer.state_dict()["state"]:
            self.hvd.broadcast_optimizer_state(optimizer, root_rank=0, model=model)
        collective_wait.watch(model)  # the allreduces overlap backward: what follows its last gradient is waiting
        return self.hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                             compression=self.compression, op=self.hvd.Average)

    def sampler(self, dataset, *, shuffle: bool, seed: int):
        return shard_sampler(dataset, num_replicas=self.hvd.size(), rank=self.hvd.rank(), shuffle=shuffle, seed=seed)

    def step(self, optimizer, scaler) -> None:
        """Wait for the gradient allreduces started during backward, then step (through the GradScaler,
        which unscales and checks the averaged gradients) without synchronizing again."""
        optimizer.synchronize()
        collective_wait.synced()
        with optimizer.skip_synchronize():
            scaler.step(optimizer)
        scaler.update()

    def end_epoch(self, model: nn.Module) -> None:
        """Parameters stay identical after every step; buffers (BatchNorm running statistics) follow
        each rank's own data, so rank 0's are broadcast before validation and checkpointing."""
        buffers = list(model.named_buffers())
        if buffers and self.hvd.size() > 1:
            self.hvd.broadcast_parameters(buffers, root_rank=0)
