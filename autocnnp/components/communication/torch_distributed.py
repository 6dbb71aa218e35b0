"""Communication init: a torch.distributed process group whose rendezvous is agreed over MPI (across
several hosts on an address the other hosts reach, checked first: rendezvous.py)."""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from autocnnp.core.settings import setting
from autocnnp.core.world import World, discover_world, free_port
from autocnnp.generator.registry import component

from .rendezvous import RendezvousConfig, agree, endpoint


@dataclass
class Config(RendezvousConfig):
    backend: Literal["auto", "gloo", "nccl"] = setting("auto", help="auto: gloo on CPU, NCCL where GPUs are present")


def _rendezvous(config: Config, world: World) -> str:
    """``address:port`` of rank 0: from the launcher's variables, else rank 0's host address agreed over MPI
    (rendezvous.agree) and a free port rank 0 picks (bound to port 0, so two jobs on one machine never collide).
    """
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if world.world_size == 1:
        return f"127.0.0.1:{free_port()}"
    from mpi4py import MPI  # initialises MPI: only for a multi-rank rendezvous

    comm = MPI.COMM_WORLD
    address = agree(config, comm)[0].address  # every rank takes part (and sets GLOO_SOCKET_IFNAME)
    return comm.bcast(endpoint(address, free_port()) if comm.rank == 0 else None, root=0)


@component("torch_distributed")
def init_torch_distributed(config: Config, *, timeout_s: float) -> World:
    """torch.distributed process group (auto: gloo on CPU, NCCL on GPU), rendezvous over MPI."""
    world = discover_world()
    backend = config.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("communication_init backend 'nccl' needs CUDA GPUs; use 'gloo' or 'auto' on CPU")
    rendezvous = _rendezvous(config, world)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"tcp://{rendezvous}", rank=world.rank,
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
