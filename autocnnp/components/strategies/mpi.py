"""Synchronous data parallelism over plain MPI (mpi4py), with no torch.distributed at all.

The same algorithm as ``ring_allreduce``: identical replicas, each rank computes gradients on its own
shard, the gradients are summed by MPI Allreduce (Open MPI picks ring or tree by message size) over
flattened buckets and averaged, then every rank applies the same optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from autocnnp.generator.protocols import MPI_LAUNCHERS, Strategy
from autocnnp.generator.registry import component

from .tensors import BucketConfig, bcast_module, mpi, pack, unpack


@dataclass
class Config(BucketConfig):
    """One non-blocking MPI Allreduce per bucket."""


class Bucket:
    """Parameters of one dtype whose gradients travel together in one flat CPU buffer."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype)


def make_buckets(model: nn.Module, cap_mb: float) -> list[Bucket]:
    """Trainable parameters in reverse registration order (the order backward produces them, as DDP),
    cut into buckets of at most ``cap_mb`` MiB (one parameter larger than that forms its own bucket)."""
    cap = cap_mb * 2**20
    buckets, current, size = [], [], 0
    for p in reversed([p for p in model.parameters() if p.requires_grad]):
        nbytes = p.numel() * p.element_size()
        if current and (size + nbytes > cap or p.dtype != current[0].dtype):
            buckets.append(Bucket(current))
            current, size = [], 0
        current.append(p)
        size += nbytes
    if current:
        buckets.append(Bucket(current))
    return buckets


@component("mpi")
class MPIAllreduce(Strategy):
    """Synchronous data parallelism, gradients averaged by MPI Allreduce (mpi4py), no torch.distributed.

    Parameters and buffers are broadcast from rank 0 with MPI Bcast at wrap time; after every backward
    the gradients are averaged with one non-blocking MPI Allreduce per bucket of ``bucket_cap_mb``."""

    requires = {"communication_init": ("mpi4py",)}
    launchers = MPI_LAUNCHERS

    def __init__(self, config: Config, **runtime):
        super().__init__(config, **runtime)
        self.comm = mpi().COMM_WORLD
        self.buckets: list[Bucket] = []

    def wrap(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.comm.size > 1:
            bcast_module(model, 0, self.comm)
        self.buckets = make_buckets(model, self.config.bucket_cap_mb)
        return model

    def after_backward(self, model: nn.Module) -> None:
        size = self.comm.size
        if size == 1:
            return
        MPI = mpi()
        requests = [self.comm.Iallreduce(MPI.IN_PLACE, pack(b.params, b.flat, grads=True).numpy(), op=MPI.SUM)
                    for b in self.buckets]
        MPI.Request.Waitall(requests)
        for b in self.buckets:
            unpack(b.flat, b.params, grads=True, divisor=size)

    def end_epoch(self, model: nn.Module) -> None:
        """Buffers (BatchNorm running statistics) follow rank 0, as DDP's broadcast_buffers does, so that
        every rank validates the model rank 0 saves."""
        if self.comm.size > 1:
            bcast_module(model, 0, self.comm, buffers_only=True)
