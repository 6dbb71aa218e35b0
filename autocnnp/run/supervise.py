"""Rank liveness and the launch's life. Each rank keeps a status file (state, message, time) whose mtime
is its heartbeat; run & manage watches them, so that a dead or hung rank ends the job with the rank
that failed first named, and stops every process of the launch on any exit: success, failure or a
signal to the front-end."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

from ..core.errors import ExitCode, Interrupted
from ..core.files import atomic_write
from ..core.rundir import RunDir
from . import processes
from .config import LaunchConfig

# a rank's verdict that run & manage passes on as it is (any other exit of a rank is a failure)
RANK_VERDICTS = (ExitCode.BAD_INPUT, ExitCode.DIVERGED, ExitCode.STOPPED)


class RankStatus:
    """Written by one rank: ``started``, ``running`` (beating), ``done``, ``stopped``, ``failed`` or
    ``terminated`` (stopped by a signal: a victim, not a cause)."""

    def __init__(self, rundir: RunDir, rank: int):
        self.path = rundir.rank_status(rank)
        self._running = False

    def set(self, state: str, message: str = "") -> None:
        atomic_write(self.path, json.dumps({"state": state, "message": message, "time": time.time()}))

    def beat(self) -> None:
        """Record progress (a few microseconds: fine for every step). Ranks are watched for hangs
        from their first beat on, so slow set-up such as building a data cache is not a hang."""
        if self._running:
            self.path.touch()
        else:
            self._running = True
            self.set("running")


def read_statuses(rundir: RunDir) -> dict[int, dict]:
    """rank -> {"state", "message", "time", "age": seconds since its last heartbeat}."""
    out, now = {}, time.time()
    for f in rundir.ranks.glob("rank*"):
        if not f.name[4:].isdigit():
            continue
        try:
            info, mtime = json.loads(f.read_text()), f.stat().st_mtime
        except (OSError, ValueError):
            continue
        out[int(f.name[4:])] = {**info, "age": now - mtime}
    return out


# how a rank fails when a peer is gone: a consequence, not a cause
_LOST_PEER = re.compile(r"connection (closed|reset|refused)|broken pipe|peer|timed? ?out|socket|ECONNRESET|EPIPE", re.I)


def diagnose(statuses: dict[int, dict], world_size: int) -> str:
    """Name the rank(s) that ended the job, the cause first: ranks that failed on their own (earliest
    first), then ranks that vanished without a word (crashed or were killed), then ranks that failed
    because a peer was gone. Ranks stopped by a signal are victims and not named."""
    failed = sorted((info.get("time", 0), rank, info["message"]) for rank, info in statuses.items()
                    if info["state"] == "failed")
    own = [f"rank {rank} failed: {message}" for _, rank, message in failed if not _LOST_PEER.search(message)]
    lost = [f"rank {rank} failed: {message}" for _, rank, message in failed if _LOST_PEER.search(message)]
    silent = sorted(rank for rank, info in statuses.items() if info["state"] in ("started", "running"))
    parts = own + ([", ".join(f"rank {r}" for r in silent) + " exited without reporting (crashed or was killed)"]
                   if silent else []) + lost
    if len(statuses) < world_size:
        missing = [r for r in range(min(world_size, 64)) if r not in statuses]
        parts.append(f"{world_size - len(statuses)} rank(s) never started ({', '.join(map(str, missing))}"
                     f"{' ...' if world_size > 64 else ''})")
    return "; then ".join(parts) or "the launcher failed"


def supervise(cmd: list[str], env: dict, rundir: RunDir, world_size: int,
              launch: LaunchConfig) -> tuple[ExitCode, str | None]:
    """Run the launch command and watch its ranks; returns the job's exit code and, for a failure, what
    ended it (one line, also printed). A signal to
    this process (Ctrl-C, SIGTERM, SIGHUP) stops every process of the launch and is raised again as
    Interrupted; SIGUSR1 (Slurm's warning before the time limit) asks the ranks to stop at the end of
    the epoch with a checkpoint."""
    shutil.rmtree(rundir.ranks, ignore_errors=True)  # ours: the run holds its folder's lock
    rundir.stop_request.unlink(missing_ok=True)
    rundir.ranks.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGUSR1, lambda *_: atomic_write(rundir.stop_request, "time limit\n"))
    proc = processes.start(cmd, env)
    try:
        with processes.interruptible():
            try:
                problem = _watch(proc, rundir, world_size, launch)
            except Interrupted as exc:
                processes.stop_session(proc, launch.stop_grace_s)
                exc.detail = f"stopped {world_size} rank(s); the same command resumes from the latest checkpoint"
                raise
            processes.stop_session(proc, launch.stop_grace_s)  # a hang's ranks; stragglers of a finished launch
    finally:
        signal.signal(signal.SIGUSR1, previous)
    code = proc.returncode
    if problem is None and code == 0:
        stopped = any(info["state"] == "stopped" for info in read_statuses(rundir).values())
        return (ExitCode.STOPPED if stopped else ExitCode.OK), None
    if problem is None and code in RANK_VERDICTS:
        return ExitCode(code), None
    if problem is None and code < 0:
        problem = f"the launcher {cmd[0]} was killed by {signal.Signals(-code).name}; its ranks were stopped with it"
    problem = problem or diagnose(read_statuses(rundir), world_size)
    print(f"autocnnp: the job failed: {problem}", file=sys.stderr, flush=True)
    return ExitCode.FAILED, problem


def _watch(proc: subprocess.Popen, rundir: RunDir, world_size: int, launch: LaunchConfig) -> str | None:
    """Wait for the launch to end; the problem that made us end it (a hung rank, ranks that never started)."""
    started = time.monotonic()
    while proc.poll() is None:
        time.sleep(0.2)
        statuses = read_statuses(rundir)
        running = {r: info["age"] for r, info in statuses.items() if info["state"] == "running"}
        if running and max(running.values()) > launch.rank_timeout_s:
            culprit = max(running, key=running.get)
            return (f"rank {culprit} stopped responding (no progress for {running[culprit]:.0f} s, "
                    f"rank_timeout_s={launch.rank_timeout_s:g})")
        if len(statuses) < world_size and time.monotonic() - started > launch.startup_timeout_s:
            return (f"{world_size - len(statuses)} rank(s) did not start within "
                    f"startup_timeout_s={launch.startup_timeout_s:g} s")
    return None
