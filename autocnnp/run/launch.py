"""Run & manage: build the launch command for a job (accelerate style: ``(cmd, env)``) and run it.

Inside an existing launch (Open MPI, Slurm, torchrun variables present) the job runs in place;
otherwise ``mpirun -np <parallelism-degree>`` starts one worker per rank.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys

from ..core.errors import JobError
from ..core.world import launcher_name
from .config import LaunchConfig
from .hosts import check_hosts
from .job import Job
from .slurm import check_srun, srun_command
from .supervise import supervise

MPIRUN_HINT = ("install Open MPI (Debian: apt-get install openmpi-bin libopenmpi-dev; or run `make venv`, "
               "which does it) or run the ranks yourself under a launcher and use launcher=inplace")


def launch_mode(launch: LaunchConfig, env=os.environ) -> str:
    """'inplace' when this process already is a rank (or the job asks for it), else the launcher asked for."""
    if launch.launcher != "auto":
        return launch.launcher
    return "inplace" if launcher_name(env) else "mpirun"


def build_command(job: Job, env=os.environ) -> tuple[list[str], dict[str, str]]:
    """The command and environment that start every rank of the job."""
    spec, launch = job.spec, job.launch
    worker = [sys.executable, "-m", "autocnnp.run.worker", str(spec.file)]
    worker += [f"--set={k}={v}" for k, v in spec.overrides.items()]  # a job variant (generator/overrides.py)
    child_env, mode = dict(env), launch_mode(launch, env)
    if mode == "inplace":
        return worker, child_env
    if mode == "srun":  # in a Slurm allocation: one task per rank, MPI wired up over PMIx
        return srun_command(job, worker, child_env)
    cmd = ["mpirun", "-np", str(job.generator.world_size), "--bind-to", "none"]
    if launch.oversubscribe:
        cmd.append("--oversubscribe")
    if launch.hostfile:
        cmd += ["--hostfile", str(launch.hostfile)]
    if launch.launch_agent:  # how mpirun reaches the other hosts (default: ssh)
        cmd += ["--mca", "plm_rsh_agent", launch.launch_agent]
    for name in ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "OMP_NUM_THREADS"):
        if name in child_env:
            cmd += ["-x", name]
    if os.geteuid() == 0:  # containers and CI often run as root; Open MPI refuses that by default
        child_env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd += shlex.split(launch.mpirun_args)
    return cmd + worker, child_env


def run(job: Job) -> int:
    """Start the ranks and wait; returns the job's exit code."""
    mode = launch_mode(job.launch)
    if mode == "inplace":
        from .worker import run_rank  # imports torch: only where this process trains

        return run_rank(job)
    if mode == "srun":
        check_srun(job)
    elif shutil.which("mpirun") is None:
        raise JobError(job.spec.where, "mpirun (Open MPI) is not installed", MPIRUN_HINT)
    elif job.launch.hostfile:  # several hosts: every one must resolve and answer before anything starts
        check_hosts(job)
    cmd, env = build_command(job)
    rundir = job.generator.rundir
    rundir.root.mkdir(parents=True, exist_ok=True)
    return supervise(cmd, env, rundir, job.generator.world_size, job.launch)
