"""One rank: load the job and train; any failure ends the whole job, naming the rank."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import traceback

from ..core.errors import DataError, ExitCode, JobError
from ..core.files import WriteRefused, append_text, refused_write
from ..core.rundir import RunDir
from ..core.world import discover_world, launcher_name
from ..generator.protocols import Tracker, adopt
from ..training.monitor import Diverged, StopRequested
from . import manifest
from .job import Job, load_job
from .processes import die_with_parent
from .supervise import SUPERVISED, RankStatus

# the launchers (launcher_name) whose ranks are MPI's: MPI_Abort reaches every peer
MPI_RANKS = ("ompi", "pmi", "slurm")


def _abort(code: int) -> None:
    """End every rank: MPI_Abort when MPI is up or the ranks are MPI's (so no peer waits forever), else exit
    (ranks that joined through MASTER_ADDR, a swarm's replicas, have no MPI: their peers lose the connection)."""
    if "mpi4py" in sys.modules or (discover_world().world_size > 1 and launcher_name() in MPI_RANKS):
        try:
            from mpi4py import MPI  # initialises MPI if needed: the other ranks wait in it

            if MPI.Is_initialized() and MPI.COMM_WORLD.Get_size() > 1:
                MPI.COMM_WORLD.Abort(code)
        except ImportError:
            pass
    sys.exit(code)


def tee_output(rundir: RunDir, rank: int) -> None:
    """Copy everything this rank writes to stdout and stderr (Python's and C libraries') into
    ``logs/rankN.log`` as well, through one ``tee`` per stream that ends when the rank does."""
    path = rundir.rank_log(rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        fd = stream.fileno()
        target = os.dup(fd)
        tee = subprocess.Popen(["tee", "-a", str(path)], stdin=subprocess.PIPE, stdout=target,  # a full disk: the
                               stderr=subprocess.DEVNULL, preexec_fn=_drain)  # console goes on, the run says why
        os.close(target)
        os.dup2(tee.stdin.fileno(), fd)
        tee.stdin.close()


def failure_text(exc: Exception, rundir: RunDir) -> str:
    """A failure on one line; a write the filesystem refused names the file (else the run folder) and the
    free space, whatever library made it."""
    refused = refused_write(exc)
    if refused is None:
        return f"{type(exc).__name__}: {exc}"
    return str(refused if isinstance(refused, WriteRefused) else WriteRefused(refused.filename or rundir, refused.errno))


def log_only(rundir: RunDir, rank: int, text: str) -> None:
    """Write ``text`` into ``logs/rankN.log`` alone, after what the rank printed so far."""
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(OSError):  # a full disk: the status file told run & manage
        append_text(rundir.rank_log(rank), text)


def _drain() -> None:
    """In a ``tee``: outlive the signals that stop the rank, to write its last words; end at their end."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def train(job: Job, beat=lambda: None) -> dict[str, float]:
    """Build the generator's run on this rank, record it in the manifest (rank 0), train it with the job's
    trackers (rank 0); stop at an epoch's end with a checkpoint when run & manage asks (``OUTPUT/.stop``)."""
    framework, run = job.build_run(beat)
    manifest.record_run(job, run)
    trackers = start_trackers(job, run) if run.world.rank == 0 else []
    stop_request = job.rundir.stop_request
    try:
        return framework.fit(run, job.monitoring, beat=beat, should_stop=stop_request.exists, trackers=trackers)
    except StopRequested as exc:  # who asked (Slurm's time limit, the user from the dashboard), for the record
        who = stop_request.read_text().strip() if stop_request.exists() else ""
        raise StopRequested(f"{exc} (asked by {who})" if who else str(exc)) from None


def start_trackers(job: Job, run) -> list:
    """The job's trackers (``<monitoring> tracker``) and the manifest's record of stragglers, started on rank 0."""
    info = manifest.run_info(job, launcher_name(os.environ) or "none", first_step=run.state.epoch * len(run.loader))
    return [*(adopt(entry.load(), Tracker)(config, info=info) for entry, config in job.trackers),
            manifest.Stragglers(info=info)]


def run_rank(job: Job) -> int:
    """Train on this rank; on error print one line naming the rank and abort the job."""
    rank = discover_world().rank
    rundir = job.rundir
    tee_output(rundir, rank)
    status = RankStatus(rundir, rank)
    status.set("started")

    def terminated(signum, frame):
        status.set("terminated", f"stopped by {signal.Signals(signum).name}")
        sys.exit(ExitCode.INTERRUPTED + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, terminated)
    try:
        with manifest.recording(job, rank):  # manifest.json on rank 0: the run's reproducibility record
            train(job, beat=status.beat)
    except DataError as exc:  # bad input data: one clear paragraph, no traceback (once, where every rank has it)
        status.set("failed", str(exc))
        if getattr(exc, "reporter", rank) == rank:
            print(f"autocnnp: rank {rank}: {exc}", file=sys.stderr, flush=True)
        _abort(ExitCode.BAD_INPUT)
    except Diverged as exc:
        status.set("failed", f"training diverged: {exc}")
        print(f"autocnnp: rank {rank}: training diverged: {exc}", file=sys.stderr, flush=True)
        _abort(ExitCode.DIVERGED)
    except StopRequested as exc:  # every rank stops at the same epoch: no abort needed
        status.set("stopped", str(exc))
        if rank == 0:
            print(f"autocnnp: {exc}; the same command resumes from it", file=sys.stderr, flush=True)
        return ExitCode.STOPPED
    except Exception as exc:  # any failure on one rank must end all of them
        text = failure_text(exc, rundir)
        status.set("failed", text)
        report = f"{traceback.format_exc()}autocnnp: rank {rank} failed: {text}\n"
        if os.environ.get(SUPERVISED):  # run & manage names the cause on the console (a peer's loss, say)
            log_only(rundir, rank, report)
        else:
            print(report, end="", file=sys.stderr, flush=True)
        _abort(ExitCode.FAILED)
    status.set("done")
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    """A rank started by run & manage: it ends when its launcher does, whatever the way."""
    die_with_parent()
    argv = sys.argv[1:] if argv is None else argv
    try:  # JOB [--set=KEY=VALUE ...]: a job variant (generator/overrides.py)
        job = load_job(argv[0], [a.removeprefix("--set=") for a in argv[1:] if a.startswith("--set=")])
    except JobError as exc:
        print(f"autocnnp: {exc}", file=sys.stderr)
        return exc.exit_code
    code = run_rank(job)
    # a stop on request is no failure for the launcher (mpirun would print its abort banner); the rank
    # status files tell run & manage that the job stopped
    return ExitCode.OK if code == ExitCode.STOPPED else code


if __name__ == "__main__":
    sys.exit(main())
