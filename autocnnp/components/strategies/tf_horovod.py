"""Horovod on TensorFlow: gradients allreduce-averaged by horovod.tensorflow."""

from __future__ import annotations

import tensorflow as tf

from autocnnp.components.communication.tf_horovod import import_horovod_tensorflow
from autocnnp.generator.protocols import MPI_LAUNCHERS, KerasStrategy
from autocnnp.generator.registry import component

from .horovod import Config


@component("horovod", frameworks=("tensorflow",))
class HorovodKeras(KerasStrategy):
    """Horovod on TensorFlow: each step's gradients allreduce-averaged in one group (MPI or Gloo controller).

    What hvd.DistributedGradientTape does, on Keras 3 variables; rank 0's variables are broadcast once
    the network is built and, for BatchNorm statistics, after every epoch (as torch's Horovod)."""

    requires = {"communication_init": ("horovod",)}
    launchers = MPI_LAUNCHERS

    def __init__(self, config: Config, *, world, device, beat=lambda: None):
        super().__init__(config, world=world, device=device, beat=beat)
        self.hvd = import_horovod_tensorflow()
        if not self.hvd.is_initialized():
            raise RuntimeError("dist_strategy 'horovod' needs communication_init 'horovod' (hvd.init()); "
                               "remove the job's communication_init action to let the engine choose it")
        self.compression = {"none": self.hvd.Compression.none, "fp16": self.hvd.Compression.fp16}[config.compression]

    def gradients(self, tape, loss, variables):
        grads = tape.gradient(loss, variables)
        if self.hvd.size() == 1:
            return grads
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]  # a variable the loss skips
        return self.hvd.grouped_allreduce(grads, op=self.hvd.Average, compression=self.compression)

    def broadcast(self, variables) -> None:
        if self.hvd.size() > 1 and variables:
            self.hvd.broadcast_variables([v.value for v in variables], root_rank=0)

    def synchronize(self, variables) -> None:
        self.broadcast(variables)
