"""Horovod's distributed optimizer: synchronous data parallelism, gradients averaged by Horovod's
allreduce (MPI or Gloo controller) while the backward pass runs.

Needs communication_init ``horovod`` (the engine picks it) and an installed Horovod: ``make horovod``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DistributedSampler

from autocnnp.components.environment.horovod_comm import import_horovod
from autocnnp.run.world import World

from .sharding import shard_sampler


class Horovod:
    """``hvd.DistributedOptimizer``: parameters broadcast from rank 0 at wrap time, each gradient
    allreduce-averaged as soon as backward produces it; each rank reads its own shard through a
    DistributedSampler of Horovod's rank and size."""

    def __init__(self, *, world: World, device: torch.device, compression: str = "none"):
        self.hvd = import_horovod()
        if not self.hvd.is_initialized():
            raise RuntimeError("dist_strategy 'horovod' needs communication_init 'horovod' (hvd.init()); "
                               "remove the job's communication_init action to let the engine choose it")
        if device.type == "cuda" and not self.hvd.cuda_built():
            raise RuntimeError("this Horovod was built without GPU operations (`make horovod` builds the CPU "
                               "version): use device_placement cpu, or rebuild Horovod with "
                               "HOROVOD_GPU_OPERATIONS=NCCL")
        self.world, self.device = world, device
        self.compression = {"none": self.hvd.Compression.none, "fp16": self.hvd.Compression.fp16}[compression]
        self._optimizer = None
        self._synchronized = False

    def wrap(self, model: nn.Module) -> nn.Module:
        """Move to the device and give every rank rank 0's parameters and buffers."""
        model = model.to(self.device)
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        hvd = self.hvd
        # Horovod's broadcast_optimizer_state initialises an empty state with one zero-gradient step,
        # which applies weight decay once and counts an Adam step: a fresh optimizer (the same on every
        # rank, built from the same hyperparameters) has nothing to broadcast, so only a filled one is.
        if optimizer.state_dict()["state"]:
            hvd.broadcast_optimizer_state(optimizer, root_rank=0, model=model)
        opt = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                       compression=self.compression, op=hvd.Average)
        torch_zero_grad = super(type(opt), opt).zero_grad  # the wrapped optimizer class's own
        hvd_step = opt.step

        def zero_grad(set_to_none: bool = True) -> None:
            """torch's signature (Horovod 0.28's takes no ``set_to_none``), with Horovod's race check."""
            if getattr(opt, "_handles", None):
                raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                     "optimizer.step() or optimizer.synchronize()")
            torch_zero_grad(set_to_none=set_to_none)

        def step(closure=None):
            """Synchronize unless after_backward already did (GradScaler reads the averaged gradients
            between the two), then step without synchronizing again."""
            if not self._synchronized:
                opt.synchronize()
            self._synchronized = False
            with opt.skip_synchronize():
                return hvd_step(closure)

        opt.zero_grad, opt.step = zero_grad, step
        self._optimizer = opt
        return opt

    def sampler(self, dataset, *, shuffle: bool, seed: int) -> DistributedSampler:
        return shard_sampler(dataset, num_replicas=self.hvd.size(), rank=self.hvd.rank(), shuffle=shuffle, seed=seed)

    def after_backward(self, model: nn.Module) -> None:
        """Wait for the gradient allreduces started during backward, so that anything between backward
        and step (a GradScaler unscaling and checking for inf) sees the averaged gradients."""
        if self._optimizer is not None:
            self._optimizer.synchronize()
            self._synchronized = True

    def end_epoch(self, model: nn.Module) -> None:
        """Parameters stay identical after every step; buffers (BatchNorm running statistics) follow
        each rank's own data, so rank 0's are broadcast before validation and checkpointing."""
        buffers = [(name, b) for name, b in model.named_buffers()]
        if buffers and self.hvd.size() > 1:
            self.hvd.broadcast_parameters(buffers, root_rank=0)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model
