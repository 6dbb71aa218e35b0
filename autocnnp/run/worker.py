"""One rank: assemble the job's generator and train; any failure ends the whole job, naming the rank."""

from __future__ import annotations

import signal
import sys
import traceback

from ..engine.errors import JobError
from ..generator.assemble import Generator, assemble
from .watch import RankStatus
from .world import discover_world


def _abort(code: int) -> None:
    """End every rank: MPI_Abort when MPI is up (so no peer waits forever), else exit."""
    if "mpi4py" in sys.modules or discover_world().size > 1:
        try:
            from mpi4py import MPI

            if MPI.Is_initialized() and MPI.COMM_WORLD.Get_size() > 1:
                MPI.COMM_WORLD.Abort(code)
        except ImportError:
            pass
    sys.exit(code)


def run_rank(gen: Generator) -> int:
    """Train on this rank; on error print one line naming the rank and abort the job."""
    from ..data.errors import DataError
    from ..training.monitor import Diverged
    from ..training.trainer import train
    from .manifest import recording

    rank = discover_world().rank
    status = RankStatus(gen.output, rank)
    status.set("started")

    def terminated(signum, frame):
        status.set("terminated", f"signal {signum} from the launcher")
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    try:
        with recording(gen, rank):  # manifest.json on rank 0: the run's reproducibility record
            train(gen, beat=status.beat)
    except DataError as exc:  # bad input data: one clear paragraph, no traceback
        status.set("failed", str(exc))
        print(f"autocnnp: rank {rank}: {exc}", file=sys.stderr, flush=True)
        _abort(2)
    except Diverged as exc:
        status.set("failed", f"training diverged: {exc}")
        print(f"autocnnp: rank {rank}: training diverged: {exc}", file=sys.stderr, flush=True)
        _abort(3)
    except Exception as exc:  # any failure on one rank must end all of them
        traceback.print_exc()
        status.set("failed", f"{type(exc).__name__}: {exc}")
        print(f"autocnnp: rank {rank} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        _abort(1)
    status.set("done")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:  # JOB [--set=KEY=VALUE ...]: a job variant (engine/overrides.py)
        from ..engine.overrides import parse_sets, read_variant

        sets = [a.removeprefix("--set=") for a in argv[1:] if a.startswith("--set=")]
        gen = assemble(read_variant(argv[0], parse_sets(sets)))
    except JobError as exc:
        print(f"autocnnp: {exc}", file=sys.stderr)
        return exc.exit_code
    return run_rank(gen)


if __name__ == "__main__":
    sys.exit(main())
