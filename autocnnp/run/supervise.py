"""Rank liveness and the launch's life. Each rank keeps a status file (state, message, time) whose mtime
is its heartbeat; run & manage watches them, so that a dead or hung rank ends the job with the rank
that failed first named, and stops every process of the launch on any exit: success, failure or a
signal to the front-end."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

from ..core.errors import ExitCode, Interrupted
from ..core.files import WriteRefused, atomic_write
from ..core.rundir import RunDir
from . import processes
from .config import LaunchConfig

SUPERVISED = "AUTOCNNP_SUPERVISED"  # set for ranks whose launch run & manage watches: it names a failure's cause

STATUS_CHARS = 500  # of the message of a status file rewritten in place (within one filesystem block)
# what a launcher gets when run & manage dies (else SIGTERM): mpirun passes SIGTERM on to its ranks only after
# odls_base_sigkill_timeout (1 s), time enough for them to train on, even to the end, with nobody watching; killed,
# it takes its ranks at once (theirs die with it, and its daemons on other hosts end their own)
ORPHANED = {"mpirun": signal.SIGKILL}
# a rank's verdict that run & manage passes on as it is (any other exit of a rank is a failure)
RANK_VERDICTS = (ExitCode.BAD_INPUT, ExitCode.DIVERGED, ExitCode.STOPPED)


class RankStatus:
    """Written by one rank: ``started``, ``running`` (beating), ``done``, ``stopped``, ``failed`` or
    ``terminated`` (stopped by a signal: a victim, not a cause)."""

    def __init__(self, rundir: RunDir, rank: int):
        self.path = rundir.rank_status(rank)
        self._running = False

    def set(self, state: str, message: str = "") -> None:
        try:
            atomic_write(self.path, json.dumps({"state": state, "message": message, "time": time.time()}))
        except WriteRefused:  # a full disk: rewrite the file in place, in the block it holds already
            short = json.dumps({"state": state, "message": message[:STATUS_CHARS], "time": time.time()}).encode()
            with contextlib.suppress(OSError):
                fd = os.open(self.path, os.O_WRONLY)
                try:
                    os.pwrite(fd, short, 0)
                    os.ftruncate(fd, len(short))
                finally:
                    os.close(fd)

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


def diagnose(statuses: dict[int, dict], world_size: int, launcher: str = "the launcher", code: int | None = None,
             killed: dict[int, int] | None = None) -> str:
    """Name what ended the job, the cause only, never its victims: the ranks that failed on their own
    (earliest first); else the ranks that vanished without a word (crashed or were killed); else a rank
    stopped by a signal nobody in the job sent (every rank stopped so: the launcher was signalled); else
    the ranks that lost a peer. Ranks taken down by a failed rank (MPI_Abort, the launcher's SIGTERM, a
    closed connection) are not named. ``launcher`` exited with ``code``; ``killed``: the ranks it saw killed by
    a signal (rank -> signal number)."""
    def named(state: str, lost: bool | None = None) -> list[tuple[float, int, str]]:
        return sorted((info.get("time", 0), rank, info.get("message", "")) for rank, info in statuses.items()
                      if info["state"] == state and (lost is None or bool(_LOST_PEER.search(info.get("message", ""))) == lost))

    ended = f"{launcher} exited with code {code}" if code is not None else f"{launcher} failed"
    own, silent, terminated, lost = named("failed", False), named("started") + named("running"), named("terminated"), \
        named("failed", True)
    if own:
        return "; ".join(f"rank {rank} failed: {message}" for _, rank, message in own)
    if silent:
        ranks = sorted(rank for _, rank, _ in silent)
        signalled = [r for r in ranks if r in (killed or {})]
        if signalled:
            return "; ".join(f"rank {r} was killed by {_signal_name(killed[r])}" for r in signalled)
        return ", ".join(f"rank {rank}" for rank in ranks) + " exited without reporting (crashed or was killed)"
    if terminated and len(terminated) == len(statuses) == world_size:
        return (f"every rank was stopped by a signal autocnnp did not send ({terminated[0][2]}); {ended}: was the "
                "launcher signalled?")
    if terminated:
        _, rank, message = terminated[0]
        return f"rank {rank} was {message} from outside the job"
    if lost:
        return "; ".join(f"rank {rank} failed: {message}" for _, rank, message in lost)
    if statuses and len(statuses) < world_size:
        missing = [r for r in range(min(world_size, 64)) if r not in statuses]
        return (f"{world_size - len(statuses)} rank(s) never started ({', '.join(map(str, missing))}"
                f"{' ...' if world_size > 64 else ''})")
    if not statuses:
        return f"no rank started: {ended} (its message is above)"
    return ended


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def verdict(code: int, rundir: RunDir) -> ExitCode | None:
    """The job's exit code when its ranks ended with ``code`` (the launcher's, or the first rank's to end):
    0 (every rank done, or stopped on request) and a rank's verdict pass on; None for a failure."""
    if code == 0:
        stopped = any(info["state"] == "stopped" for info in read_statuses(rundir).values())
        return ExitCode.STOPPED if stopped else ExitCode.OK
    return ExitCode(code) if code in RANK_VERDICTS else None


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
    previous = signal.signal(signal.SIGUSR1,
                             lambda *_: atomic_write(rundir.stop_request, "SIGUSR1 (Slurm's time-limit warning)\n"))
    proc = processes.start(cmd, env, stderr=subprocess.PIPE, orphaned=ORPHANED.get(os.path.basename(cmd[0]),
                                                                                   signal.SIGTERM))
    stopping, killed = threading.Event(), {}
    forwarding = processes.forward_stderr(proc.stderr, sys.stderr, mute=stopping, killed=killed)
    try:
        with processes.interruptible():
            try:
                problem = _watch(proc, rundir, world_size, launch)
            except Interrupted as exc:
                stopping.set()
                processes.stop_session(proc, launch.stop_grace_s)
                exc.detail = f"stopped {world_size} rank(s); the same command resumes from the latest checkpoint"
                raise
            processes.stop_session(proc, launch.stop_grace_s)  # a hang's ranks; stragglers of a finished launch
    finally:
        signal.signal(signal.SIGUSR1, previous)
        forwarding.join(timeout=5.0)  # the launcher's last words before ours
    code = proc.returncode
    if problem is None and (passed := verdict(code, rundir)) is not None:
        return passed, None
    if problem is None and code < 0:
        problem = f"the launcher {cmd[0]} was killed by {signal.Signals(-code).name}; its ranks were stopped with it"
    problem = problem or diagnose(read_statuses(rundir), world_size, f"the launcher {cmd[0]}", code, killed)
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
