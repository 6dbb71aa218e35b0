"""A run owns its output folder: an exclusive ``flock`` on ``OUTPUT/.lock`` for the life of the process
that starts the ranks, the file naming its holder. A second run of the same folder is refused, naming
the holder; a lock whose holder died (the kernel released it) is taken over with a note."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import JobError, Location
from ..core.files import first_missing, read_json
from ..core.rundir import RunDir
from . import manifest

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
        earlier = _read(fd) if _flock(fd, fcntl.LOCK_EX, rundir, where) else None
        if earlier is None or _alive_here(earlier):
            raise JobError(where, f"the output folder {rundir} is in use by another run: {_holder_text(_read(fd))}",
                           "wait for it to end or stop it, or give this run another <output>")
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


SCAN_LIMIT = 10_000  # folders looked through below an output folder for another run's


def run_in(folder: Path) -> str | None:
    """Which run ``folder`` is the output folder of (its manifest's job, or the holder of its lock while it
    has no manifest yet), or None for a folder that is no run's."""
    record = manifest.read(RunDir(folder)) or {}
    if "autocnnp_manifest" in record:
        job = record.get("job")
        return f"the run of {job['file']}" if isinstance(job, dict) and job.get("file") else "a run"
    holder = read_json(RunDir(folder).lock) or {}
    return f"the run of {_holder_text(holder)}" if "pid" in holder else None


def _runs_below(root: Path):
    """The run folders below ``root``, outside its own layout (a run's folders hold no other run), not
    looking into a run folder nor past SCAN_LIMIT folders."""
    top, pending, seen = RunDir(root), [root], 0
    while pending and seen < SCAN_LIMIT:
        folder = pending.pop()
        try:
            entries = [e for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for entry in entries:
            seen += 1
            if folder == root and top.owns(entry.name):
                continue
            if run_in(Path(entry.path)) is not None:
                yield Path(entry.path)
            else:
                pending.append(Path(entry.path))


def check_apart(rundir: RunDir, where: Location) -> None:
    """The output folder is neither inside another run's folder (its checkpoints, say) nor holds one: each
    run would write its lock, manifest and metrics among the other's. A run's own runs (``tune/``, the
    ``seed-S/`` folders of ``run --repeat``) are part of its layout."""
    root = rundir.root.resolve()
    for folder, inner in zip(root.parents, (root, *root.parents)):
        other = run_in(folder)
        if other is not None and not RunDir(folder).keeps_runs_in(inner.name):
            raise JobError(where, f"the output folder {rundir} is inside {folder}, the output folder of {other}",
                           "give this run an <output> folder of its own, outside other runs' folders")
    inner = next(_runs_below(root), None) if root.is_dir() else None
    if inner is not None:
        raise JobError(where, f"the output folder {rundir} holds {inner}, the output folder of {run_in(inner)}",
                       "give this run an <output> folder of its own that holds no other run, or move that run")


class Claim:
    """A front-end's hold on the output folder: until :meth:`keep` (the ranks start), whatever the run
    created there (the folder itself and its parents, the lock, a data cache) is removed again when the
    command ends early: refused, stopped by a signal or failed. A refused or stopped run leaves nothing."""

    def __init__(self, root: Path):
        self.root = root
        self.created = first_missing(root)
        self.before = None if self.created is not None else _names(root)
        self.kept = False

    def keep(self) -> None:
        """The ranks start: from now on the folder holds the run's work."""
        self.kept = True

    def undo(self) -> None:
        if self.kept:
            return
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
        elif self.before is not None:
            for name in (_names(self.root) or set()) - self.before:
                path = self.root / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def _names(folder: Path) -> set[str] | None:
    """The names in ``folder``; None when it cannot be listed (then nothing of it is removed)."""
    try:
        return set(os.listdir(folder))
    except OSError:
        return None


@contextlib.contextmanager
def own_output(job: Job, front_end: bool):
    """Hold the job's output folder for the block (``autocnnp run``, ``deploy --swarm``, or rank 0 of ranks
    started by another launcher); a dead holder's lock taken over is said on stderr. A front-end gets a
    :class:`Claim`: what it created is removed again if the block ends before it keeps the folder."""
    rundir = job.rundir
    where = job.output_where
    check_apart(rundir, where)
    claim = Claim(rundir.root) if front_end else None
    with owned(rundir, where) as note:
        if note:
            print(f"autocnnp: note: {note}", file=sys.stderr, flush=True)
        try:
            yield claim
        except BaseException:
            if claim is not None:
                claim.undo()
            raise


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
        return not _flock(fd, fcntl.LOCK_SH, rundir, Location(path)) or _alive_here(_read(fd))
    finally:
        os.close(fd)


def _flock(fd: int, kind: int, rundir: RunDir, where: Location) -> bool:
    """Take the lock without waiting: False when another process holds it. A filesystem without locks
    (some NFS mounts) is refused: two runs of one folder could not be told apart there."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:  # ENOLCK, ENOSYS, EOPNOTSUPP
        raise JobError(where, f"the output folder {rundir} is on a filesystem that cannot lock files "
                       f"({exc.strerror or exc})", "give the run an <output> folder on a local or lock-capable "
                       "filesystem (NFS needs its lock service)") from None
    return True


def _alive_here(record: dict) -> bool:
    """Whether the holder a lock file names still runs on this host: its lock was free, so the
    filesystem's locks do not stop a second run (checked only where the holder's pid can be seen)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        cmdline = Path(f"/proc/{record['pid']}/cmdline").read_bytes()
    except OSError:
        return False
    return record["pid"] != os.getpid() and b"autocnnp" in cmdline
