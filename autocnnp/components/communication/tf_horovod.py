"""Communication init for Horovod on TensorFlow: ``hvd.init()`` of horovod.tensorflow.

``make horovod`` builds Horovod's TensorFlow extension too where ``make tensorflow`` ran first (see
cluster/build-horovod.sh). It is imported here, at run time, never when a job is validated."""

from __future__ import annotations

import torch

from autocnnp.core.world import World, discover_world
from autocnnp.generator.registry import component

from .horovod_world import INSTALL_HINT, Config
from .rendezvous import agree_over_mpi


def import_horovod_tensorflow():
    """``horovod.tensorflow``, or a RuntimeError that says how to build it."""
    try:
        import horovod.tensorflow as hvd
    except ImportError as exc:
        raise RuntimeError(f"Horovod for TensorFlow is not usable in this environment ({exc}): run `make tensorflow`, "
                           f"then {INSTALL_HINT}") from None
    return hvd


def allreduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a CPU tensor over every Horovod rank, in place (returned): the trainer's metrics."""
    hvd = import_horovod_tensorflow()
    if hvd.size() > 1:
        with torch.no_grad():
            t.copy_(torch.from_numpy(hvd.allreduce(t.numpy(), op=hvd.Sum).numpy()))
    return t


@component("horovod", frameworks=("tensorflow",))
def init_horovod_tensorflow(config: Config, *, timeout_s: float) -> World:
    """hvd.init() of horovod.tensorflow: Horovod's MPI (mpirun) or Gloo controller joins the ranks.

    Rank, world size and local rank are Horovod's. Its collectives have no timeout: run & manage's
    watchdog (``rank_timeout_s``) ends a hung job instead."""
    hvd = import_horovod_tensorflow()
    agree_over_mpi(config)
    hvd.init()
    launched = discover_world()
    if launched.world_size > 1 and hvd.size() != launched.world_size:
        raise RuntimeError(f"communication_init 'horovod': Horovod sees {hvd.size()} rank(s) but the launcher "
                           f"started {launched.world_size}; start the job with mpirun (launcher auto or mpirun)")
    return World(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), backend="horovod",
                 all_reduce=allreduce_sum)
