"""Synchronous data parallelism over plain MPI (mpi4py), with no torch.distributed at all.

The same algorithm as ``ring_allreduce``: identical replicas, each rank computes gradients on its own
shard, the gradients are summed by MPI Allreduce (Open MPI picks ring or tree by message size) over
flattened buckets and averaged, then every rank applies the same optimizer step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DistributedSampler

from autocnnp.run.world import World

from .sharding import shard_sampler


def mpi():
    from mpi4py import MPI

    return MPI


_MPI_OK = (torch.float64, torch.float32, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def bcast_tensor(t: torch.Tensor, root: int, comm) -> None:
    """Overwrite ``t`` on every rank with ``root``'s values (through a CPU copy where numpy cannot view it)."""
    direct = t.device.type == "cpu" and t.is_contiguous() and t.dtype in _MPI_OK
    work = t.detach() if direct else t.detach().to("cpu", torch.float64 if t.dtype not in _MPI_OK else t.dtype)
    work = work.contiguous()
    comm.Bcast(work.numpy(), root=root)
    if not direct:
        with torch.no_grad():
            t.copy_(work.to(t.device, t.dtype))


def bcast_module(module: nn.Module, root: int, comm, buffers_only: bool = False) -> None:
    """Give every rank ``root``'s parameters and buffers (in registration order, so ranks match)."""
    tensors = [] if buffers_only else list(module.parameters())
    for t in [*tensors, *module.buffers()]:
        bcast_tensor(t, root, comm)


def pack_gradients(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    """Copy the parameters' gradients one after another into ``flat`` (zeros where a gradient is None)."""
    offset = 0
    for p in params:
        n = p.numel()
        if p.grad is None:
            flat[offset:offset + n].zero_()
        else:
            flat[offset:offset + n].copy_(p.grad.detach().reshape(-1))
        offset += n


class Bucket:
    """Parameters of one dtype whose gradients travel together in one flat CPU buffer."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype)

    def pack(self) -> torch.Tensor:
        pack_gradients(self.params, self.flat)
        return self.flat

    def unpack(self, divisor: float) -> None:
        """Gradients from the flat buffer, divided by ``divisor`` (the number of summed ranks)."""
        offset = 0
        for p in self.params:
            n = p.numel()
            g = self.flat[offset:offset + n].view_as(p).to(p.device)
            if p.grad is None:
                p.grad = g.div(divisor)
            else:
                p.grad.copy_(g).div_(divisor)
            offset += n


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


class MPIAllreduce:
    """Parameters and buffers broadcast from rank 0 with MPI Bcast at wrap time; after every backward
    the gradients are averaged with one non-blocking MPI Allreduce per bucket of ``bucket_cap_mb``."""

    def __init__(self, *, world: World, device: torch.device, bucket_cap_mb: float = 25.0):
        self.world, self.device, self.bucket_cap_mb = world, device, bucket_cap_mb
        self.comm = mpi().COMM_WORLD
        self.buckets: list[Bucket] = []

    def wrap(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.comm.size > 1:
            bcast_module(model, 0, self.comm)
        self.buckets = make_buckets(model, self.bucket_cap_mb)
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        return optimizer

    def sampler(self, dataset, *, shuffle: bool, seed: int) -> DistributedSampler:
        return shard_sampler(dataset, num_replicas=self.world.size, rank=self.world.rank, shuffle=shuffle, seed=seed)

    def after_backward(self, model: nn.Module) -> None:
        size = self.comm.size
        if size == 1:
            return
        MPI = mpi()
        requests = [self.comm.Iallreduce(MPI.IN_PLACE, b.pack().numpy(), op=MPI.SUM) for b in self.buckets]
        MPI.Request.Waitall(requests)
        for b in self.buckets:
            b.unpack(size)

    def end_epoch(self, model: nn.Module) -> None:
        """Buffers (BatchNorm running statistics) follow rank 0, as DDP's broadcast_buffers does, so that
        every rank validates the model rank 0 saves."""
        if self.comm.size > 1:
            bcast_module(model, 0, self.comm, buffers_only=True)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model
