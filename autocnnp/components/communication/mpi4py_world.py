"""Communication init over MPI alone (mpi4py): no torch.distributed process group is created.

Strategies that talk MPI themselves (``mpi``, ``parameter_server``, ``fedavg``) use it; the trainer's
metrics are summed with :func:`allreduce_sum` through ``World.all_reduce``.
"""

from __future__ import annotations

import numpy as np
import torch

from autocnnp.core.world import World, discover_world
from autocnnp.generator.registry import component


def _comm():
    from mpi4py import MPI

    return MPI, MPI.COMM_WORLD


# dtypes numpy or MPI cannot reduce directly: summed in a wider copy
_WIDEN = {torch.bfloat16: torch.float64, torch.float16: torch.float64, torch.bool: torch.int64}


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view sharing memory with ``t`` (CPU, contiguous, a dtype MPI can reduce)."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.dtype in _WIDEN:
        raise ValueError(f"need a contiguous CPU tensor with an MPI dtype, got {t.dtype} on {t.device}")
    return t.detach().numpy()


def allreduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over every rank of MPI.COMM_WORLD, in place (returned). Any device and dtype:
    tensors numpy cannot view (GPU, non-contiguous, fp16/bf16, bool) go through a CPU copy."""
    MPI, comm = _comm()
    if comm.size == 1:
        return t
    direct = t.device.type == "cpu" and t.is_contiguous() and t.dtype not in _WIDEN
    work = t if direct else t.detach().to("cpu", _WIDEN.get(t.dtype, t.dtype)).contiguous()
    comm.Allreduce(MPI.IN_PLACE, as_numpy(work), op=MPI.SUM)
    if not direct:
        with torch.no_grad():
            t.copy_(work.to(t.device, t.dtype))
    return t


@component("mpi4py")
def init_mpi4py(*, timeout_s: float) -> World:
    """MPI.COMM_WORLD through mpi4py only; no torch.distributed process group.

    Rank, world size and local rank come from MPI.COMM_WORLD. MPI collectives have no timeout:
    ``timeout_s`` is accepted for the protocol and run & manage's watchdog (``rank_timeout_s``) ends a
    hung job instead.
    """
    MPI, comm = _comm()
    launched = discover_world()
    if comm.size != launched.world_size:
        raise RuntimeError(f"communication_init 'mpi4py': MPI sees {comm.size} rank(s) but the launcher started "
                           f"{launched.world_size}; start the job with mpirun (launcher auto or mpirun), or use "
                           "communication_init torch_distributed with another launcher")
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    try:
        local_rank, local_size = local.rank, local.size
    finally:
        local.Free()
    return World(comm.rank, comm.size, local_rank, local_size, backend="mpi", all_reduce=allreduce_sum)
