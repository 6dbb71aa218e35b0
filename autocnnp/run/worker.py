"""One rank: load the job and train; any failure ends the whole job, naming the rank."""

from __future__ import annotations

import signal
import sys
import traceback

from ..core.errors import DataError, ExitCode, JobError
from ..core.world import discover_world
from ..training.monitor import Diverged
from ..training.trainer import build, fit
from . import manifest
from .job import Job, load_job
from .supervise import RankStatus


def _abort(code: int) -> None:
    """End every rank: MPI_Abort when MPI is up (so no peer waits forever), else exit."""
    if "mpi4py" in sys.modules or discover_world().world_size > 1:
        try:
            from mpi4py import MPI  # initialises MPI if needed: the other ranks wait in it

            if MPI.Is_initialized() and MPI.COMM_WORLD.Get_size() > 1:
                MPI.COMM_WORLD.Abort(code)
        except ImportError:
            pass
    sys.exit(code)


def train(job: Job, beat=lambda: None) -> dict[str, float]:
    """Build the generator's run on this rank, record it in the manifest (rank 0), train it."""
    run = build(job.generator, job.monitoring, beat=beat, timeout_s=job.launch.rank_timeout_s + 30)
    manifest.record_run(job, run)
    return fit(run, job.monitoring, beat)


def run_rank(job: Job) -> int:
    """Train on this rank; on error print one line naming the rank and abort the job."""
    rank = discover_world().rank
    status = RankStatus(job.generator.rundir, rank)
    status.set("started")

    def terminated(signum, frame):
        status.set("terminated", f"signal {signum} from the launcher")
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    try:
        with manifest.recording(job, rank):  # manifest.json on rank 0: the run's reproducibility record
            train(job, beat=status.beat)
    except DataError as exc:  # bad input data: one clear paragraph, no traceback
        status.set("failed", str(exc))
        print(f"autocnnp: rank {rank}: {exc}", file=sys.stderr, flush=True)
        _abort(ExitCode.BAD_INPUT)
    except Diverged as exc:
        status.set("failed", f"training diverged: {exc}")
        print(f"autocnnp: rank {rank}: training diverged: {exc}", file=sys.stderr, flush=True)
        _abort(ExitCode.DIVERGED)
    except Exception as exc:  # any failure on one rank must end all of them
        traceback.print_exc()
        status.set("failed", f"{type(exc).__name__}: {exc}")
        print(f"autocnnp: rank {rank} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        _abort(ExitCode.FAILED)
    status.set("done")
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:  # JOB [--set=KEY=VALUE ...]: a job variant (generator/overrides.py)
        job = load_job(argv[0], [a.removeprefix("--set=") for a in argv[1:] if a.startswith("--set=")])
    except JobError as exc:
        print(f"autocnnp: {exc}", file=sys.stderr)
        return exc.exit_code
    return run_rank(job)


if __name__ == "__main__":
    sys.exit(main())
