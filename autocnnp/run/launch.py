"""Run & manage: build the launch command for a job (accelerate style: ``(cmd, env)``) and run it.

Inside an existing launch (Open MPI, Slurm, torchrun variables present) the job runs in place;
otherwise ``mpirun -np <parallelism-degree>`` starts one worker per rank.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from ..core.errors import DataError, ExitCode, Interrupted, JobError
from ..core.files import WriteRefused, atomic_write
from ..core.world import discover_world, launcher_name
from ..generator.overrides import apply_overrides
from ..tracking import FOLLOWED, FrontEnd
from . import lock, manifest, preflight
from .config import LaunchConfig
from .hosts import check_hosts, parse_hostfile
from .job import Job, load_job
from .manifest import PARENT_RUN
from .slurm import check_srun, srun_command
from .supervise import SUPERVISED, supervise

# how an attempt ended, for its trackers (any other exit code: it failed)
ENDS = {ExitCode.OK: "completed", ExitCode.DIVERGED: "diverged", ExitCode.STOPPED: "stopped"}


@contextlib.contextmanager
def parent_run(folder: Path):
    """Runs started in the block are children of the run in ``folder`` (``run --repeat``, ``tune``): the
    ranks find it in their environment and their trackers group them under it."""
    previous = os.environ.get(PARENT_RUN)
    os.environ[PARENT_RUN] = str(folder)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PARENT_RUN, None)
        else:
            os.environ[PARENT_RUN] = previous


MPIRUN_HINT = ("install Open MPI (Debian: apt-get install openmpi-bin libopenmpi-dev; or run `make venv`, "
               "which does it) or run the ranks yourself under a launcher and use launcher=inplace")


def launch_mode(launch: LaunchConfig, env=os.environ) -> str:
    """'inplace' when this process already is a rank (or the job asks for it), else the launcher asked for."""
    if launch.launcher != "auto":
        return launch.launcher
    return "inplace" if launcher_name(env) else "mpirun"


def build_command(job: Job, env=os.environ, program: tuple[str, ...] = ("autocnnp.run.worker",)
                  ) -> tuple[list[str], dict[str, str]]:
    """The command and environment that start every rank of the job (``cpus_per_task`` cores and
    threads per rank); each rank runs ``python -m PROGRAM JOB --set=...`` (``program``: a module and its
    first arguments; ``autocnnp scale`` starts its profile so)."""
    spec, launch = job.spec, job.launch
    worker = [sys.executable, "-m", *program, str(spec.file)]
    worker += [f"--set={k}={v}" for k, v in spec.overrides.items()]  # a job variant (generator/overrides.py)
    child_env, mode = dict(env), launch_mode(launch, env)
    if mode == "inplace":
        return worker, child_env
    child_env[SUPERVISED] = "1"
    if mode == "srun":  # in a Slurm allocation: one task per rank, MPI wired up over PMIx
        return srun_command(job, worker, child_env)
    # run & manage counted the slots itself (preflight.check_slots): mpirun, which counts only physical
    # cores, must not refuse what was checked
    cmd = ["mpirun", "-np", str(job.world_size), "--oversubscribe"]
    threads = job.slurm.cpus_per_task
    if threads > 1:  # each rank gets its own cores, and torch as many threads
        cmd += ["--map-by", f"slot:PE={threads}", "--bind-to", "core:overload-allowed" if launch.oversubscribe else "core"]
        child_env.setdefault("OMP_NUM_THREADS", str(threads))
    else:
        cmd += ["--bind-to", "none"]
    if launch.hostfile:
        cmd += ["--hostfile", str(launch.hostfile)]
    if launch.launch_agent:  # how mpirun reaches the other hosts (default: ssh)
        cmd += ["--mca", "plm_rsh_agent", launch.launch_agent]
    for name in ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "OMP_NUM_THREADS", PARENT_RUN, FOLLOWED, SUPERVISED):
        if name in child_env:
            cmd += ["-x", name]
    if os.geteuid() == 0:  # containers and CI often run as root; Open MPI refuses that by default
        child_env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd += shlex.split(launch.mpirun_args)
    return cmd + worker, child_env


def run(job: Job) -> int:
    """Own the output folder, check everything, start the ranks and watch them; restart a failed job
    from its latest checkpoint up to ``max_restarts`` times. Returns the job's exit code."""
    mode = checked_mode(job)
    if mode == "inplace":  # this process is a rank: rank 0 owns the folder for all of them
        from .worker import run_rank  # imports torch: only where this process trains

        if discover_world().rank != 0:
            return run_rank(job)
        with lock.own_output(job, front_end=False):
            return run_rank(job)
    with lock.own_output(job, front_end=True) as claim:
        return attempts(job, mode, claim.keep)


def checked_mode(job: Job) -> str:
    """How the job's ranks start (:func:`launch_mode`), checked: its launcher is there."""
    mode = launch_mode(job.launch)
    if mode == "srun":
        check_srun(job)
    elif mode == "mpirun" and shutil.which("mpirun") is None:
        raise JobError(job.spec.where, "mpirun (Open MPI) is not installed", MPIRUN_HINT)
    return mode


def attempts(job: Job, mode: str, started=lambda: None) -> int:
    """In an output folder this process holds: check, start the ranks with launcher ``mode`` and watch them
    (``started()`` once they start), restarting a failed job up to ``max_restarts`` times; the exit code."""
    rundir = job.rundir
    with contextlib.ExitStack() as stack:
        preflight.check_framework(job)
        preflight.check_output(job)
        attempt, tracking = 0, None
        while True:
            try:
                now = _ready(job)
            except (JobError, DataError) as exc:
                if not attempt:
                    raise
                problem = f"restart {attempt} could not start: {exc}"
                _record_failure(rundir, problem)
                print(f"autocnnp: {problem}", file=sys.stderr, flush=True)
                return ExitCode.FAILED
            started()
            tracking = tracking or _tracking(now, mode, stack)
            cmd, env = build_command(now, {**os.environ, **(tracking.environment if tracking else {})})
            code, problem = _supervised(cmd, env, now, tracking)
            restart = code == ExitCode.FAILED and attempt < job.launch.max_restarts
            if code == ExitCode.FAILED:
                _record_failure(rundir, problem, restart=attempt + 1 if restart else None)
            if not restart:
                return code
            attempt += 1
            delay = job.launch.restart_backoff_s * 2 ** (attempt - 1)
            print(f"autocnnp: restart {attempt} of {job.launch.max_restarts} in {delay:g} s from the latest "
                  f"checkpoint (after: {problem})", file=sys.stderr, flush=True)
            time.sleep(delay)


def _record_failure(rundir, problem: str, restart: int | None = None) -> None:
    """The failure in the manifest, unless the filesystem refuses it (the console said why the job failed)."""
    with contextlib.suppress(WriteRefused):
        manifest.record_failure(rundir, problem, restart=restart)


def _tracking(job: Job, mode: str, stack: contextlib.ExitStack) -> FrontEnd | None:
    """The mlflow tracker's run & manage side (its sender, closed with ``stack``), if the job has that tracker:
    started with the first attempt that passed the checks."""
    config = job.tracker("mlflow")
    if config is None:
        return None
    tracking = FrontEnd(config, manifest.run_info(job, mode))
    stack.callback(tracking.close)
    return tracking


def _supervised(cmd: list[str], env: dict, job: Job, tracking) -> tuple[ExitCode, str | None]:
    """One attempt, watched (``supervise``); its MLflow run (``tracking``) starts with it and ends however it ends."""
    if tracking:
        tracking.started()
    try:
        code, problem = supervise(cmd, env, job.rundir, job.world_size, job.launch)
    except Interrupted:
        if tracking:
            tracking.ended("terminated")
        raise
    if tracking:
        tracking.ended(ENDS.get(code, "failed"))
    return code, problem


def _ready(job: Job) -> Job:
    """The job as it starts now, checked: slots, pretrained weights, data and a minibatch per rank."""
    now = _available(job)
    preflight.check_slots(now, os.environ)
    preflight.check_inputs(now)
    return now


def _available(job: Job) -> Job:
    """The job as it can start now: with ``min_ranks``, the hosts that answer (a filtered hostfile in the
    run folder) and as many ranks as their slots hold, down to ``min_ranks``; otherwise the job itself
    once every host answers."""
    launch = job.launch
    if launch.hostfile is None:
        return job
    hosts = check_hosts(job, keep_going=launch.min_ranks is not None)
    gone = len(parse_hostfile(launch.hostfile, job.where("hostfile"))) - len(hosts)
    offered = sum(slots for _, slots in hosts)
    if launch.min_ranks is None or (not gone and offered >= job.world_size):
        return job
    if offered < launch.min_ranks:
        raise JobError(job.where("min_ranks"), f"the hosts that answer offer {offered} slot(s), fewer than "
                       f"min_ranks={launch.min_ranks}", "bring hosts back, or lower min_ranks")
    world_size = min(job.world_size, offered)
    rundir = job.rundir
    hostfile = rundir.root / "hostfile.available"
    atomic_write(hostfile, "".join(f"{host} slots={slots}\n" for host, slots in hosts))
    print(f"autocnnp: going on with {world_size} rank(s) on {len(hosts)} host(s) that answer "
          f"(parallelism-degree {job.world_size}, min_ranks {launch.min_ranks})", file=sys.stderr, flush=True)
    spec = apply_overrides(job.spec, {"parallelism-degree": str(world_size)}) if world_size != job.world_size \
        else job.spec
    return load_job(spec).with_cluster({"hostfile": hostfile})
