"""Communication init on TensorFlow: the MPI ranks become a TensorFlow cluster (TF_CONFIG), agreed over MPI."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from autocnnp.core.world import World, discover_world, free_port
from autocnnp.generator.registry import component

from .mpi4py_world import allreduce_sum, init_mpi4py
from .rendezvous import RendezvousConfig, agree, endpoint


@dataclass
class Config(RendezvousConfig):
    """Where the workers of several hosts reach each other (rendezvous.py)."""


@component("tf_config", frameworks=("tensorflow",))
def init_tf_config(config: Config, *, timeout_s: float) -> World:
    """MPI ranks as TensorFlow workers: each rank's host address (agreed and checked over mpi4py across
    several hosts: rendezvous.py) and a free port, gathered over mpi4py, in TF_CONFIG.

    So mpirun, srun and hostfiles start TensorFlow jobs unchanged. Worker ``i`` is MPI rank ``i``; the
    trainer's metrics are summed over MPI. A single rank gets no TF_CONFIG (a one-worker cluster)."""
    if discover_world().world_size == 1:
        return World(backend="tensorflow")
    world = init_mpi4py(timeout_s=timeout_s)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    address = agree(config, comm)[comm.rank].address
    workers = comm.allgather(endpoint(address, free_port()))
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": world.rank}})
    return World(world.rank, world.world_size, world.local_rank, world.local_world_size, "tensorflow", allreduce_sum)
