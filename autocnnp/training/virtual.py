"""Virtual ranks (``<parallelism-degree virtual="k">``): each process emulates k ranks of a job whose
parallelism degree is processes x k. Every step it takes k micro-batches of the job's minibatch, virtual
rank ``process * k + j`` reading the shard a real rank of that number would read, sums their gradients
(each loss divided by k) and exchanges them once: the step k real ranks take, one after another.
BatchNorm normalises each micro-batch by its own statistics, as each rank would; the running statistics
kept are those of the process's first virtual rank, as a real rank keeps its own (and the strategies hand
rank 0's to every rank)."""

from __future__ import annotations

import contextlib

import torch

from ..core.world import World
from ..generator.protocols import shard_sampler


class VirtualShards:
    """The shards of ``world``'s k virtual ranks, interleaved by ``minibatch``: a batch of k x minibatch
    samples is virtual rank 0's minibatch, then rank 1's, ... (each shard as long as a real rank's)."""

    def __init__(self, dataset, world: World, k: int, minibatch: int, *, shuffle: bool, seed: int):
        self.minibatch = minibatch
        self.shards = [shard_sampler(dataset, num_replicas=world.world_size * k, rank=world.rank * k + j,
                                     shuffle=shuffle, seed=seed) for j in range(k)]

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def __iter__(self):
        orders = [list(s) for s in self.shards]
        for start in range(0, len(orders[0]), self.minibatch):
            for order in orders:
                yield from order[start:start + self.minibatch]

    def set_epoch(self, epoch: int) -> None:
        for s in self.shards:
            s.set_epoch(epoch)


def sampler(strategy, dataset, world: World, k: int, minibatch: int, *, shuffle: bool, seed: int):
    """This process's training samples: the strategy's own sampler for one rank per process, else the
    interleaved shards of its k virtual ranks."""
    if k == 1:
        return strategy.sampler(dataset, shuffle=shuffle, seed=seed)
    return VirtualShards(dataset, world, k, minibatch, shuffle=shuffle, seed=seed)


@contextlib.contextmanager
def first_statistics(model: torch.nn.Module, micro_batches: int):
    """Keep the running statistics (BatchNorm buffers) as the first micro-batch left them: call the
    yielded function after it; the later micro-batches' updates are undone on leaving."""
    buffers = list(model.buffers()) if micro_batches > 1 else []
    kept: list[torch.Tensor] = []

    def after_first() -> None:
        kept.extend(b.detach().clone() for b in buffers)

    yield after_first
    with torch.no_grad():
        for b, v in zip(buffers, kept):
            b.copy_(v)
