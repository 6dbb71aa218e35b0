"""Training environment definition: communication init, device placement, memory allocation."""

from dataclasses import dataclass, field
from typing import Literal

from autocnnp.generator.registry import COMMUNICATION, MEMORY, PLACEMENT


@dataclass
class TorchDistributedConfig:
    backend: Literal["auto", "gloo", "nccl"] = "auto"


@dataclass
class FractionConfig:
    fraction: float = field(default=0.9, metadata={"min": 0.01, "max": 1.0})


_ENV = "autocnnp.components.environment"
COMMUNICATION.register("torch_distributed", f"{_ENV}.communication:init_torch_distributed", TorchDistributedConfig,
                       "torch.distributed process group (auto: gloo on CPU, NCCL on GPU), rendezvous over MPI")
COMMUNICATION.register("mpi4py", f"{_ENV}.mpi_comm:init_mpi4py", None,
                       "MPI.COMM_WORLD through mpi4py only; no torch.distributed process group")
COMMUNICATION.register("horovod", f"{_ENV}.horovod_comm:init_horovod", None,
                       "hvd.init(): Horovod's MPI (mpirun) or Gloo (horovodrun --gloo) controller, no "
                       "torch.distributed group; `make horovod` installs Horovod")
PLACEMENT.register("local_rank", f"{_ENV}.placement:local_rank", None,
                   "one GPU per local rank (cuda:local_rank mod GPUs); CPU where no GPU is present")
PLACEMENT.register("cpu", f"{_ENV}.placement:cpu", None, "every rank on the CPU")
MEMORY.register("soft_placement", f"{_ENV}.memory:soft_placement", None,
                "caching allocator defaults; fall back to the CPU when the placed GPU is absent")
MEMORY.register("expandable_segments", f"{_ENV}.memory:expandable_segments", None,
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (less fragmentation, grows on demand)")
MEMORY.register("fraction", f"{_ENV}.memory:fraction", FractionConfig,
                "cap this process at a fraction of the GPU's memory (torch.cuda.set_per_process_memory_fraction)")
