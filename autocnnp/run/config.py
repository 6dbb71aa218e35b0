"""Run-wide settings from ``<cluster>`` and ``<monitoring>`` (typed, torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass
class ClusterConfig:
    """How run & manage starts the ranks."""

    launcher: Literal["auto", "mpirun", "inplace", "srun"] = "auto"
    hostfile: Path | None = field(default=None, metadata={"must_exist": True})
    mpirun_args: str = ""
    oversubscribe: bool = True
    rank_timeout_s: float = field(default=300.0, metadata={"min": 1.0})
    startup_timeout_s: float = field(default=120.0, metadata={"min": 1.0})
    # several hosts: the program mpirun starts remote daemons with (plm_rsh_agent; default ssh)
    launch_agent: str = ""
    # Slurm (`autocnnp submit`): the allocation the sbatch script asks for
    nodes: int = field(default=1, metadata={"min": 1})
    tasks_per_node: int | None = field(default=None, metadata={"min": 1})  # default: ranks / nodes, rounded up
    cpus_per_task: int = field(default=1, metadata={"min": 1})
    gpus_per_task: int = field(default=0, metadata={"min": 0})
    time_limit: str = "01:00:00"
    partition: str = ""
    account: str = ""
    job_name: str = ""
    slurm_output: str = "slurm-%j.out"  # relative paths: in the job's output folder
    sbatch_args: str = ""
    # `autocnnp deploy`: the shared folder jobs are deployed to (`--to` overrides)
    deploy_dir: Path | None = None


@dataclass
class MonitoringConfig:
    """What rank 0 reports and when a run is stopped as diverged."""

    progress: bool = True
    tensorboard: bool = True
    plots: bool = True
    sample_interval_s: float = field(default=2.0, metadata={"min": 0.1})
    stop_on_divergence: bool = True
    divergence_factor: float = field(default=1e3, metadata={"min": 1.0})
    log_every_steps: int = field(default=10, metadata={"min": 1})
    # manifest.json's dataset checksum: content (sha256 of the files), stat (names, sizes, mtimes),
    # auto (content up to 512 MiB, else stat) or none
    data_checksum: Literal["auto", "content", "stat", "none"] = "auto"
