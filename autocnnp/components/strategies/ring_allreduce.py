"""The default distributed optimizer: synchronous ring-allreduce data parallelism with torch DDP."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from autocnnp.core.settings import setting
from autocnnp.generator.protocols import MPI_LAUNCHERS, Strategy, collective_wait
from autocnnp.generator.registry import component

from . import cross_rank_batchnorm
from .tensors import BucketConfig


@dataclass
class Config(BucketConfig):
    sync_batchnorm: bool = setting(False, help="BatchNorm statistics over every rank's samples")
    find_unused_parameters: bool = setting(False, help="let DDP skip parameters that get no gradient")

    def refuses_virtual_ranks(self) -> str | None:
        return ("sync_batchnorm takes BatchNorm statistics over every rank's samples at once, which micro-batches "
                "taken one after another cannot" if self.sync_batchnorm else super().refuses_virtual_ranks())


@component("ring_allreduce")
class RingAllreduce(Strategy):
    """Synchronous data parallelism, gradients ring-allreduced by torch DDP.

    Parameters are broadcast from rank 0 at wrap time; gradients are averaged by bucketed ring
    allreduce overlapped with the backward pass; each rank reads its own shard."""

    requires = {"communication_init": ("torch_distributed",)}
    launchers = MPI_LAUNCHERS

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.config.sync_batchnorm:  # torch's SyncBatchNorm needs CUDA; ours runs on gloo as well
            model = (nn.SyncBatchNorm.convert_sync_batchnorm(model) if self.device.type == "cuda"
                     else cross_rank_batchnorm.convert(model))
        model = model.to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=self.config.bucket_cap_mb,
                                      find_unused_parameters=self.config.find_unused_parameters)
        # Time blocked in collectives: DDP's forward broadcasts the buffers before the network's forward runs,
        # and backward ends waiting for the gradient buckets' allreduces after the last gradient arrived.
        ddp.register_forward_pre_hook(collective_wait.enter)
        model.register_forward_pre_hook(collective_wait.leave)
        collective_wait.watch(model)
        return ddp

    def after_backward(self, model: nn.Module) -> None:
        collective_wait.synced()

    def accumulating(self, model: nn.Module):
        """DDP's no_sync: the micro-batches' gradients are summed here and exchanged once, by the last backward."""
        return model.no_sync()

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model
