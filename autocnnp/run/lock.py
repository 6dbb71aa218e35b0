"""A run owns its output folder: an exclusive ``flock`` on ``OUTPUT/.lock`` for the life of the process
that starts the ranks, the file naming its holder. A second run of the same folder is refused, naming
the holder; a lock whose holder died (the kernel released it) is taken over with a note."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import JobError, Location
from ..core.rundir import RunDir

if TYPE_CHECKING:
    from .job import Job


def _holder_text(record: dict) -> str:
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')} since {record.get('started', '?')} "
            f"({record.get('command', '?')})")


@contextlib.contextmanager
def owned(rundir: RunDir, where: Location):
    """Hold the run folder's lock for the block; yields a note when a dead holder's lock was taken over."""
    try:
        rundir.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(rundir.lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise JobError(where, f"the output folder {rundir} cannot be written ({exc.strerror or exc})",
                       "choose an <output> folder you can write to, or fix its permissions") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = _read(fd)
            raise JobError(where, f"the output folder {rundir} is in use by another run: {_holder_text(record)}",
                           "wait for it to end or stop it, or give this run another <output>") from None
        earlier = _read(fd)
        note = (f"took over the lock of {_holder_text(earlier)}, which ended without releasing it"
                if earlier else None)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(["autocnnp", *sys.argv[1:3]]),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        try:
            yield note
        finally:
            os.ftruncate(fd, 0)  # released cleanly: the next run finds no holder to report
    finally:
        os.close(fd)


@contextlib.contextmanager
def own_output(job: Job):
    """Hold the job's output folder for the block (``autocnnp run``, ``deploy --swarm``); a dead holder's
    lock taken over is said on stderr."""
    with owned(job.generator.rundir, job.spec.output.where if job.spec.output else job.spec.where) as note:
        if note:
            print(f"autocnnp: note: {note}", file=sys.stderr, flush=True)
        yield


def _read(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def is_held(rundir: RunDir) -> bool:
    """Whether a live process holds the run folder's lock."""
    path = Path(rundir.lock)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
