"""Federated averaging (McMahan et al. 2017; the aggregation-server federation of Pati et al.,
Nature Communications 2022): every rank is a collaborator that trains on its own fixed partition of
the training set with no communication per step; after every ``local_epochs`` epochs (a federated
round) the model parameters and buffers are averaged over the collaborators, weighted by their number
of training samples, and the consensus model continues on every rank.

Each collaborator keeps its own optimizer state (momentum, Adam moments) across rounds. Between two
rounds the ranks hold different models: an epoch that ends no round validates each rank's local model
on its validation shard (the scores are still summed over all ranks); the checkpoint is rank 0's
model, the consensus model after a round. End training on a round (end_epoch a multiple of
local_epochs) to finish with the consensus model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from autocnnp.core.settings import setting
from autocnnp.generator.protocols import MPI_LAUNCHERS, Strategy, StrategyConfig, Traffic
from autocnnp.generator.registry import component

from .tensors import pack, unpack


@dataclass
class Config(StrategyConfig):
    local_epochs: int = setting(1, min=1, help="epochs each collaborator trains between two averagings")

    def replicas(self, world_size: int) -> int:
        return 1  # each step uses one collaborator's batch: no linear LR scaling


class PartitionSampler:
    """Rank ``rank``'s fixed, contiguous part of ``range(n)`` (parts differ in size by at most one),
    reshuffled within the part every epoch."""

    def __init__(self, n: int, rank: int, world_size: int, *, shuffle: bool, seed: int):
        base, extra = divmod(n, world_size)
        start = rank * base + min(rank, extra)
        self.indices = list(range(start, start + base + (rank < extra)))
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        if not self.shuffle:
            return iter(self.indices)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter([self.indices[i] for i in torch.randperm(len(self.indices), generator=g).tolist()])


@component("fedavg")
class FedAvg(Strategy):
    """Federated averaging: local training on fixed partitions, sample-weighted model average every local_epochs.

    Every ``local_epochs`` epochs one all-reduce of parameters and buffers through the communication
    init's ``World`` averages the models."""

    requires = {"communication_init": ("torch_distributed", "mpi4py")}
    launchers = MPI_LAUNCHERS

    def __init__(self, config: Config, **runtime):
        super().__init__(config, **runtime)
        if self.world.world_size > 1 and self.world.all_reduce is None:
            raise RuntimeError("fedavg needs a communication init that provides World.all_reduce")
        self.samples = 1  # this collaborator's weight: its training samples, set by sampler()
        self.epochs = 0

    @classmethod
    def traffic(cls, config: Config, *, grad_bytes: int, model_bytes: int, world_size: int, steps_per_epoch: int) -> Traffic:
        """One all-reduce of the parameters and buffers per round (``local_epochs`` epochs), between epochs."""
        del grad_bytes
        return Traffic("ring", model_bytes, world_size, every_steps=config.local_epochs * max(1, steps_per_epoch),
                       overlap=0.0)

    def wrap(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        self.average(model, 1.0 if self.world.rank == 0 else 0.0)  # everyone starts from rank 0's model
        return model

    def sampler(self, dataset, *, shuffle: bool, seed: int) -> PartitionSampler:
        sampler = PartitionSampler(len(dataset), self.world.rank, self.world.world_size, shuffle=shuffle, seed=seed)
        self.samples = len(sampler)
        return sampler

    def end_epoch(self, model: nn.Module) -> None:
        self.epochs += 1
        if self.epochs % self.config.local_epochs == 0:
            self.average(model, float(self.samples))

    def average(self, model: nn.Module, weight: float) -> None:
        """Replace every parameter and floating-point buffer by the ``weight``-weighted mean over the ranks
        (one all-reduce in the parameters' dtype; the weights are normalised in float64). Integer buffers
        (BatchNorm's batch counter) are counters, not weights: each rank keeps its own."""
        if self.world.world_size == 1:
            return
        tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
        wire = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        flat = torch.empty(sum(t.numel() for t in tensors) + 1, dtype=torch.float64)
        pack(tensors, flat[:-1])
        flat[-1] = 1.0
        flat = self.world.all_reduce((flat * weight).to(wire)).to(torch.float64)
        total = flat[-1].item()
        if total <= 0:
            raise RuntimeError("fedavg: the collaborators hold no training samples")
        unpack(flat[:-1], tensors, divisor=total)
