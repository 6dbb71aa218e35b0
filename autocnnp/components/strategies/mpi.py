"""Synchronous data parallelism over plain MPI (mpi4py), with no torch.distributed at all.

The same algorithm as ``ring_allreduce``: identical replicas, each rank computes gradients on its own
shard, the gradients are summed by MPI Allreduce over flattened float32 buckets and averaged, then every
rank applies the same optimizer step.

The buckets are reduced with the blocking ``Allreduce`` (Open MPI's ``coll/tuned`` picks the algorithm by
size), not ``Iallreduce``: Open MPI 4.1's non-blocking ``coll/libnbc`` reduces to rank 0 and broadcasts back
(a binomial tree) whenever fewer than 4 ranks take part or the buffer is ``MPI.IN_PLACE``: twice the ring's
bytes, one direction at a time; 4-14x slower for a 7.35 MiB bucket between 2 ranks on one node
(``benchmarks/allreduce_bound.py``). Nothing overlaps ``after_backward`` anyway: it runs after the backward
pass. Ranks on one node talk through Open MPI's shared-memory BTL (vader, single-copy CMA), which ``ob1``
prefers to tcp for peers on the same node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from autocnnp.generator.protocols import MPI_LAUNCHERS, Strategy, collective_wait
from autocnnp.generator.registry import component

from .tensors import BucketConfig, bcast_module, mpi, pack, unpack


@dataclass
class Config(BucketConfig):
    """One MPI Allreduce per bucket."""


class Bucket:
    """Parameters of one dtype whose gradients travel together in one flat CPU buffer.

    After the allreduce the gradients of CPU parameters are views into the buffer (as DDP's
    ``gradient_as_bucket_view``): nothing is copied back, and a gradient still in place next step (``zero_grad``
    without ``set_to_none``) is not copied in either."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype)

    def average(self, comm, MPI) -> None:
        """Replace every parameter's gradient by its mean over the ranks of ``comm``."""
        pack(self.params, self.flat, grads=True)
        comm.Allreduce(MPI.IN_PLACE, self.flat.numpy(), op=MPI.SUM)
        self.flat.div_(comm.size)
        unpack(self.flat, self.params, grads=True, views=True)


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
    the gradients are averaged with one in-place MPI Allreduce per bucket of ``bucket_cap_mb``."""

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
        if self.comm.size == 1:
            return
        MPI = mpi()
        with collective_wait.blocking():
            for b in self.buckets:
                b.average(self.comm, MPI)

    def end_epoch(self, model: nn.Module) -> None:
        """Buffers (BatchNorm running statistics) follow rank 0, as DDP's broadcast_buffers does, so that
        every rank validates the model rank 0 saves."""
        if self.comm.size > 1:
            bcast_module(model, 0, self.comm, buffers_only=True)
