"""Communication init for Horovod: ``hvd.init()``; no torch.distributed process group is created.

Under ``mpirun`` (what ``autocnnp run`` starts, and what ``horovodrun`` uses where MPI is built in)
Horovod's MPI controller joins the ranks; under ``horovodrun --gloo`` its Gloo controller does.
Horovod is not a pinned dependency: ``make horovod`` builds it for this torch (see
cluster/build-horovod.sh). It is imported here, at run time, never when a job is validated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autocnnp.core.world import World, discover_world
from autocnnp.generator.registry import component

from .rendezvous import RendezvousConfig, agree_over_mpi

INSTALL_HINT = ("run `make horovod` (it builds Horovod 0.28.1 for this torch into .venv; "
                "see cluster/build-horovod.sh)")


def import_horovod():
    """``horovod.torch``, or a RuntimeError that says how to install it."""
    try:
        import horovod.torch as hvd
    except ImportError as exc:  # also a stale build whose extension no longer loads against this torch
        raise RuntimeError(f"Horovod is not usable in this environment ({exc}): {INSTALL_HINT}") from None
    return hvd


# dtypes Horovod cannot reduce: summed in a wider copy
_WIDEN = {torch.bool: torch.int64, torch.bfloat16: torch.float64}


def allreduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over every Horovod rank, in place (returned). GPU tensors go through the CPU when
    this Horovod was built without GPU operations (``make horovod`` builds the CPU version)."""
    hvd = import_horovod()
    if hvd.size() == 1:
        return t
    device = t.device if t.device.type == "cpu" or hvd.cuda_built() else torch.device("cpu")
    work = t.detach().to(device, _WIDEN.get(t.dtype, t.dtype)).contiguous()
    summed = hvd.allreduce(work, op=hvd.Sum)
    with torch.no_grad():
        t.copy_(summed.to(t.device, t.dtype))
    return t


@dataclass
class Config(RendezvousConfig):
    """Across several hosts, each host's address is agreed and checked over MPI before ``hvd.init()``, and
    GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME name its interface (rendezvous.py)."""


@component("horovod")
def init_horovod(config: Config, *, timeout_s: float) -> World:
    """hvd.init(): Horovod's MPI (mpirun) or Gloo (horovodrun --gloo) controller, no torch.distributed group.

    Rank, world size and local rank are Horovod's; ``make horovod`` installs Horovod.

    Horovod's collectives have no timeout here: ``timeout_s`` is accepted for the protocol, and run
    & manage's watchdog (``rank_timeout_s``) ends a hung job instead.
    """
    hvd = import_horovod()
    agree_over_mpi(config)
    hvd.init()
    launched = discover_world()
    if launched.world_size > 1 and hvd.size() != launched.world_size:
        raise RuntimeError(f"communication_init 'horovod': Horovod sees {hvd.size()} rank(s) but the launcher "
                           f"started {launched.world_size}; start the job with mpirun (launcher auto or mpirun) or "
                           "horovodrun")
    return World(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), backend="horovod",
                 all_reduce=allreduce_sum)
