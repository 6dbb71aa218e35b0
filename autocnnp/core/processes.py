"""A process's life tied to its parent's (the kernel signals it when the parent ends, Linux), the cores
and threads it may use, and a pool of worker processes that never outlives its work."""

from __future__ import annotations

import contextlib
import os
import signal

PR_SET_PDEATHSIG = 1


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or a Slurm job's share, not the
    machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on macOS and Windows
        return os.cpu_count() or 1


def default_threads(processes_on_node: int = 1) -> int:
    """CPU threads for one of ``processes_on_node`` processes sharing this node: ``OMP_NUM_THREADS`` where it is
    set (run & manage sets it from cpus_per_task), else the usable cores shared among them."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        return int(threads)
    return max(1, usable_cores() // max(1, processes_on_node))


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent ends (Linux; a no-op elsewhere)."""
    import ctypes  # here: ctypes, multiprocessing and concurrent.futures cost `autocnnp validate` ~20 ms

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:  # the parent ended before the request took effect
        os.kill(os.getpid(), sig)


def _start_worker(setup) -> None:
    """A worker leaves Ctrl-C to the parent (which stops it), dies with the parent, then runs ``setup()``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(signal.SIGTERM)
    if setup is not None:
        setup()


@contextlib.contextmanager
def case_runner(workers: int, setup=None):
    """``run(fn, jobs)``: ``fn(*job)`` for each job, results as they come; in this process for one worker, else
    in a pool of ``workers`` spawned processes (each running ``setup()``, a module-level function, first) that is
    shut down when the work ends and stopped (its processes killed) on any error or Ctrl-C."""
    if workers <= 1:
        yield lambda fn, jobs: (fn(*job) for job in jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(setup,))

    def run(fn, jobs):
        for future in as_completed([pool.submit(fn, *job) for job in jobs]):
            yield future.result()

    try:
        yield run
    except BaseException:
        for process in list((pool._processes or {}).values()):  # no public way to stop running workers before 3.14
            process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)  # its manager thread finds them gone and reaps them all
        raise
    pool.shutdown()
