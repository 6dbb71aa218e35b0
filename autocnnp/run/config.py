"""The ``<cluster>`` section: three Configs, one per part of run & manage that reads it. A property
belongs to exactly one of them (run/job.py routes it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..core.settings import setting


@dataclass
class LaunchConfig:
    """How run & manage starts the ranks and watches them (run/launch.py, run/supervise.py)."""

    launcher: Literal["auto", "mpirun", "inplace", "srun"] = setting(
        "auto", help="auto: in place under a launcher's variables, else mpirun")
    hostfile: Path | None = setting(None, must_exist=True, help="Open MPI hostfile of the hosts to run on")
    mpirun_args: str = setting("", help="extra mpirun arguments")
    oversubscribe: bool = setting(False, help="allow more ranks than slots (cores, hostfile slots, Slurm tasks)")
    rank_timeout_s: float = setting(300.0, min=1.0, help="a rank silent this long ends the job")
    startup_timeout_s: float = setting(120.0, min=1.0, help="ranks that have not started after this end the job")
    launch_agent: str = setting("", help="how mpirun reaches other hosts (plm_rsh_agent; default ssh)")
    stop_grace_s: float = setting(10.0, min=0.0, help="when stopping the job, seconds between SIGTERM and SIGKILL")
    max_restarts: int = setting(0, min=0, help="restart a failed or hung job this many times from its latest "
                                               "checkpoint")
    restart_backoff_s: float = setting(5.0, min=0.0, help="seconds before the first restart, doubled for each next")
    min_ranks: int | None = setting(None, min=1, help="at a (re)start, go on with the hostfile's reachable slots "
                                                      "when they are fewer than parallelism-degree, down to this many")


@dataclass
class SlurmConfig:
    """The allocation ``autocnnp submit`` asks Slurm for (run/slurm.py)."""

    nodes: int = setting(1, min=1, help="nodes to allocate")
    tasks_per_node: int | None = setting(None, min=1, help="ranks per node (default: ranks / nodes, rounded up)")
    cpus_per_task: int = setting(1, min=1, help="CPU cores per rank")
    gpus_per_task: int = setting(0, min=0, help="GPUs per rank")
    time_limit: str = setting("01:00:00", help="wall-clock limit (minutes, HH:MM:SS or D-HH:MM:SS)")
    partition: str = setting("", help="Slurm partition (default: the cluster's default one)")
    account: str = setting("", help="account to charge")
    job_name: str = setting("", help="Slurm job name (default: autocnnp-<job file name>)")
    mem: str = setting("", help="memory per node (sbatch --mem, e.g. 32G; default: the partition's)")
    exclusive: bool = setting(False, help="whole nodes for this job alone (sbatch --exclusive)")
    setup: str = setting("", help="shell lines the batch script runs before training (e.g. module load openmpi), "
                                  "one command per line (';' stays within a line); the first that fails ends "
                                  "the job")
    signal_before_s: int = setting(300, min=0, help="Slurm warns this many seconds before the time limit (at most "
                                                    "half of it); the job then stops at the end of an epoch with a "
                                                    "checkpoint (0: no warning)")
    requeue: bool = setting(False, help="a job stopped by the time-limit warning requeues itself and resumes")
    slurm_output: str = setting("slurm-%j.out", help="the batch log; a relative path is in the run's output folder")
    sbatch_args: str = setting("", help="extra #SBATCH directives")


@dataclass
class DeployConfig:
    """Where ``autocnnp deploy`` puts the job (run/deploy.py; ``--to`` overrides)."""

    deploy_dir: Path | None = setting(None, help="the shared folder jobs are deployed to")


CLUSTER_CONFIGS = (LaunchConfig, SlurmConfig, DeployConfig)
