"""The default distributed optimizer: synchronous ring-allreduce data parallelism with torch DDP."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from autocnnp.run.world import World

from . import sync_batchnorm
from .sharding import shard_sampler


class RingAllreduce:
    """DDP: parameters broadcast from rank 0 at wrap time, gradients averaged by bucketed ring allreduce
    overlapped with the backward pass; each rank reads its own shard through a DistributedSampler."""

    def __init__(self, *, world: World, device: torch.device, bucket_cap_mb: float = 25.0,
                 sync_batchnorm: bool = False, find_unused_parameters: bool = False):
        self.world, self.device = world, device
        self.bucket_cap_mb, self.sync_batchnorm = bucket_cap_mb, sync_batchnorm
        self.find_unused_parameters = find_unused_parameters

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.sync_batchnorm:  # torch's SyncBatchNorm needs CUDA; ours runs on gloo as well
            model = (nn.SyncBatchNorm.convert_sync_batchnorm(model) if self.device.type == "cuda"
                     else sync_batchnorm.convert(model))
        model = model.to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=self.bucket_cap_mb,
                                       find_unused_parameters=self.find_unused_parameters)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        return optimizer

    def sampler(self, dataset, *, shuffle: bool, seed: int) -> DistributedSampler:
        return shard_sampler(dataset, num_replicas=self.world.size, rank=self.world.rank, shuffle=shuffle, seed=seed)

    def after_backward(self, model: nn.Module) -> None:
        """Nothing to do: DDP already reduced the gradients during backward."""

    def end_epoch(self, model: nn.Module) -> None:
        """Nothing to do: replicas stay identical after every step."""

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model
