"""Who am I: rank, world size and local rank, read from the standard launcher variables."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

# (rank, world size, local rank, local world size) variables of each launcher, most specific first.
_LAUNCHERS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),  # horovodrun --gloo
    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    # srun sets the STEP variables in each task; a batch script (sbatch) has SLURM_PROCID=0 and
    # SLURM_NTASKS but no step, and is not a rank: it starts them (run & manage, launcher mpirun or srun)
    ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks, and how to sum a tensor over them."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = ""
    # Sums a tensor over all ranks (in place, returned); set by communication init.
    all_reduce: Callable | None = field(default=None, compare=False, repr=False)



def launcher_name(env=os.environ) -> str | None:
    """The launcher this process was started by, if any."""
    for rank, size, _, _ in _LAUNCHERS:
        if rank in env and size in env:
            return rank.split("_")[0].lower()
    return None


def discover_world(env=os.environ) -> World:
    """Read rank variables; a process started by no launcher is rank 0 of 1."""
    for rank, size, local, local_size in _LAUNCHERS:
        if rank in env and size in env:
            lsize = env.get(local_size, "1").split("(")[0].split(",")[0]  # Slurm: "2(x3),1"
            return World(int(env[rank]), int(env[size]), int(env.get(local, 0)), int(lsize or 1))
    return World()


def free_port() -> int:
    """A TCP port free now on this host (bound to port 0, then released)."""
    import socket  # here: component headers read by `autocnnp validate` import this module

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]

