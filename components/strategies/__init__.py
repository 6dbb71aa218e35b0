"""Distributed optimizers (the extensible dist_strategy action)."""

from dataclasses import dataclass, field

from autocnnp.generator.registry import STRATEGIES


@dataclass
class RingAllreduceConfig:
    bucket_cap_mb: float = field(default=25.0, metadata={"min": 0.1})
    sync_batchnorm: bool = False
    find_unused_parameters: bool = False


STRATEGIES.register("ring_allreduce", "autocnnp.components.strategies.ring_allreduce:RingAllreduce",
                    RingAllreduceConfig, "synchronous data parallelism, gradients ring-allreduced by torch DDP",
                    requires={"communication_init": ("torch_distributed",)}, launchers=("mpirun", "inplace"))
