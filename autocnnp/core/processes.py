"""A process's life tied to its parent's (the kernel signals it when the parent ends, Linux), and the cores
and threads it may use."""

from __future__ import annotations

import contextlib
import ctypes
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
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:  # the parent ended before the request took effect
        os.kill(os.getpid(), sig)
