"""Distributed optimizers (the extensible dist_strategy action)."""

from dataclasses import dataclass, field
from typing import Literal

from autocnnp.generator.registry import STRATEGIES

# Every built-in runs as MPI ranks: started by mpirun (srun too, see assemble) or already running in place.
MPI_LAUNCHERS = ("mpirun", "inplace")


@dataclass
class RingAllreduceConfig:
    bucket_cap_mb: float = field(default=25.0, metadata={"min": 0.1})
    sync_batchnorm: bool = False
    find_unused_parameters: bool = False


@dataclass
class MPIConfig:
    bucket_cap_mb: float = field(default=25.0, metadata={"min": 0.1})


@dataclass
class ParameterServerConfig:
    server: Literal["shared", "dedicated"] = "shared"


@dataclass
class FedAvgConfig:
    local_epochs: int = field(default=1, metadata={"min": 1})


@dataclass
class HorovodConfig:
    compression: Literal["none", "fp16"] = "none"


STRATEGIES.register("ring_allreduce", "autocnnp.components.strategies.ring_allreduce:RingAllreduce",
                    RingAllreduceConfig, "synchronous data parallelism, gradients ring-allreduced by torch DDP",
                    requires={"communication_init": ("torch_distributed",)}, launchers=MPI_LAUNCHERS)
STRATEGIES.register("mpi", "autocnnp.components.strategies.mpi_allreduce:MPIAllreduce", MPIConfig,
                    "synchronous data parallelism, gradients averaged by MPI Allreduce (mpi4py), no torch.distributed",
                    requires={"communication_init": ("mpi4py",)}, launchers=MPI_LAUNCHERS)
STRATEGIES.register("parameter_server", "autocnnp.components.strategies.parameter_server:ParameterServer",
                    ParameterServerConfig, "synchronous parameter server over MPI: workers push gradients, pull "
                    "parameters (server: shared = rank 0 also trains, dedicated = last rank only serves)",
                    requires={"communication_init": ("mpi4py",)}, launchers=MPI_LAUNCHERS)
STRATEGIES.register("fedavg", "autocnnp.components.strategies.fedavg:FedAvg", FedAvgConfig,
                    "federated averaging: local training on fixed partitions, sample-weighted model average "
                    "every local_epochs", requires={"communication_init": ("torch_distributed", "mpi4py")},
                    launchers=MPI_LAUNCHERS)
STRATEGIES.register("horovod", "autocnnp.components.strategies.horovod:Horovod", HorovodConfig,
                    "Horovod DistributedOptimizer: gradients allreduce-averaged during backward (MPI or Gloo "
                    "controller; `make horovod` installs it)", requires={"communication_init": ("horovod",)},
                    launchers=MPI_LAUNCHERS)
