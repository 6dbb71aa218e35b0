"""The ring-allreduce strategy on TensorFlow: tf.distribute.MultiWorkerMirroredStrategy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import tensorflow as tf
import torch

from autocnnp.core.settings import setting
from autocnnp.generator.protocols import MPI_LAUNCHERS, KerasStrategy, StrategyConfig
from autocnnp.generator.registry import component

from .tensors import pack, unpack

_COLLECTIVES = {"ring": "RING", "nccl": "NCCL", "auto": "AUTO"}


@dataclass
class Config(StrategyConfig):
    collectives: Literal["ring", "nccl", "auto"] = setting(
        "ring", help="how gradients are all-reduced: ring (gRPC ring collectives), nccl (GPUs), auto (TensorFlow picks)")


@component("ring_allreduce", frameworks=("tensorflow",))
class MultiWorkerMirrored(KerasStrategy):
    """Synchronous data parallelism with tf.distribute.MultiWorkerMirroredStrategy, gradients ring-allreduced.

    One replica per rank (the placement shows each rank one GPU, or the CPU); the cluster is the MPI
    world, written into TF_CONFIG by communication_init tf_config. Variables are broadcast from
    worker 0 when created; each replica's loss counts 1/replicas of the step, and the optimizer sums
    the replicas' gradients."""

    requires = {"communication_init": ("tf_config",)}
    launchers = MPI_LAUNCHERS

    def __init__(self, config: Config, *, world, device, beat=lambda: None):
        super().__init__(config, world=world, device=device, beat=beat)
        implementation = getattr(tf.distribute.experimental.CommunicationImplementation, _COLLECTIVES[config.collectives])
        options = tf.distribute.experimental.CommunicationOptions(implementation=implementation)
        self.distribution = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        self.share = 1.0 / self.distribution.num_replicas_in_sync

    def synchronize(self, variables) -> None:
        """The mean over ranks of the floating-point ``variables`` (variables are created equal, broadcast
        from worker 0, so ``broadcast`` has nothing to do; each replica updates its own BatchNorm statistics)."""
        values = [(v, v.numpy()) for v in variables if "float" in str(v.dtype)]
        if self.world.world_size == 1 or not values:
            return
        tensors = [torch.from_numpy(np.asarray(value, dtype=np.float64)) for _, value in values]
        flat = pack(tensors, torch.empty(sum(t.numel() for t in tensors), dtype=torch.float64))
        unpack(self.world.all_reduce(flat), tensors, divisor=self.world.world_size)
        for (v, value), mean in zip(values, tensors, strict=True):
            v.assign(mean.numpy().astype(value.dtype))

    def scope(self):
        return self.distribution.scope()

    def run(self, fn, *args):
        return self.distribution.experimental_local_results(self.distribution.run(fn, args=args))[0]
