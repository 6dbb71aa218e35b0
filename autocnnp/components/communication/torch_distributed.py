"""Communication init: a torch.distributed process group whose rendezvous is agreed over MPI."""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from autocnnp.core.settings import setting
from autocnnp.core.world import World, discover_world, free_port, host_address
from autocnnp.generator.registry import component


@dataclass
class Config:
    backend: Literal["auto", "gloo", "nccl"] = setting("auto", help="auto: gloo on CPU, NCCL where GPUs are present")


def _rendezvous(world: World) -> tuple[str, int]:
    """Address and port of rank 0: from the launcher's variables, else picked by rank 0 and sent over MPI.

    Rank 0 binds port 0 to get a free port, so two jobs on one machine never collide.
    """
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if world.world_size == 1:
        return "127.0.0.1", free_port()
    from mpi4py import MPI  # initialises MPI: only for a multi-rank rendezvous

    comm = MPI.COMM_WORLD
    return comm.bcast((host_address(), free_port()) if comm.rank == 0 else None, root=0)


@component("torch_distributed")
def init_torch_distributed(config: Config, *, timeout_s: float) -> World:
    """torch.distributed process group (auto: gloo on CPU, NCCL on GPU), rendezvous over MPI."""
    world = discover_world()
    backend = config.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("communication_init backend 'nccl' needs CUDA GPUs; use 'gloo' or 'auto' on CPU")
    addr, port = _rendezvous(world)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=world.rank,
                                world_size=world.world_size, timeout=datetime.timedelta(seconds=timeout_s))
        atexit.register(_close)
    return World(world.rank, world.world_size, world.local_rank, world.local_world_size, backend,
                 all_reduce=_nccl_sum if backend == "nccl" else _sum)


def _close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def _nccl_sum(t: torch.Tensor) -> torch.Tensor:
    """NCCL reduces GPU tensors only: go through the current device and back."""
    return _sum(t.cuda()).to(t.device)
