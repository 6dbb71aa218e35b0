"""Run & manage: build the launch command for a job (accelerate style: ``(cmd, env)``) and run it.

Inside an existing launch (Open MPI, Slurm, torchrun variables present) the job runs in place;
otherwise ``mpirun -np <parallelism-degree>`` starts one worker per rank.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from ..engine.errors import JobError
from ..generator.assemble import Generator
from .watch import supervise
from .world import launcher_name

MPIRUN_HINT = ("install Open MPI (Debian: apt-get install openmpi-bin libopenmpi-dev; or run `make venv`, "
               "which does it) or run the ranks yourself under a launcher and use launcher=inplace")


def launch_mode(gen: Generator, env=os.environ) -> str:
    """'inplace' when this process already is a rank (or the job asks for it), else 'mpirun'."""
    if gen.cluster.launcher != "auto":
        return gen.cluster.launcher
    return "inplace" if launcher_name(env) else "mpirun"


def build_command(gen: Generator, env=os.environ) -> tuple[list[str], dict[str, str]]:
    """The command and environment that start every rank of ``gen``'s job."""
    worker = [sys.executable, "-m", "autocnnp.run.worker", str(gen.job.file)]
    worker += [f"--set={k}={v}" for k, v in gen.job.overrides.items()]  # a job variant (engine/overrides.py)
    child_env, mode = dict(env), launch_mode(gen, env)
    if mode == "inplace":
        return worker, child_env
    if mode == "srun":  # in a Slurm allocation: one task per rank, MPI wired up over PMIx
        from .slurm import srun_command

        return srun_command(gen, worker, child_env)
    cmd = ["mpirun", "-np", str(gen.degree), "--bind-to", "none"]
    if gen.cluster.oversubscribe:
        cmd.append("--oversubscribe")
    if gen.cluster.hostfile:
        cmd += ["--hostfile", str(gen.cluster.hostfile)]
    if gen.cluster.launch_agent:  # how mpirun reaches the other hosts (default: ssh)
        cmd += ["--mca", "plm_rsh_agent", gen.cluster.launch_agent]
    for name in ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "OMP_NUM_THREADS"):
        if name in child_env:
            cmd += ["-x", name]
    if os.geteuid() == 0:  # containers and CI often run as root; Open MPI refuses that by default
        child_env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd += shlex.split(gen.cluster.mpirun_args)
    return cmd + worker, child_env


def run(gen: Generator) -> int:
    """Start the ranks and wait; returns the job's exit code."""
    mode = launch_mode(gen)
    if mode == "inplace":
        from .worker import run_rank

        return run_rank(gen)
    if mode == "srun":
        from .slurm import check_srun

        check_srun(gen)
    elif shutil.which("mpirun") is None:
        raise JobError(gen.job.where, "mpirun (Open MPI) is not installed", MPIRUN_HINT)
    elif gen.cluster.hostfile:  # several hosts: every one must resolve and answer before anything starts
        from .hosts import check_hosts

        check_hosts(gen)
    cmd, env = build_command(gen)
    Path(gen.output).mkdir(parents=True, exist_ok=True)
    return supervise(cmd, env, gen.output, gen.degree, gen.cluster.rank_timeout_s, gen.cluster.startup_timeout_s)
