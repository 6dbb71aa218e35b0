"""Rank liveness. Each rank keeps a status file (state, message) whose mtime is its heartbeat;
run & manage watches them so that a dead or hung rank ends the job with its rank named."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from ..core.files import atomic_write
from ..core.rundir import RunDir
from .config import LaunchConfig


class RankStatus:
    """Written by one rank: ``started``, ``running`` (beating), ``done``, ``failed`` or ``terminated``."""

    def __init__(self, rundir: RunDir, rank: int):
        self.path = rundir.rank_status(rank)
        self._running = False

    def set(self, state: str, message: str = "") -> None:
        atomic_write(self.path, json.dumps({"state": state, "message": message}))

    def beat(self) -> None:
        """Record progress (a few microseconds: fine for every step). Ranks are watched for hangs
        from their first beat on, so slow set-up such as building a data cache is not a hang."""
        if self._running:
            os.utime(self.path)
        else:
            self._running = True
            self.set("running")


def read_statuses(rundir: RunDir) -> dict[int, tuple[str, str, float]]:
    """rank -> (state, message, seconds since its last heartbeat)."""
    out, now = {}, time.time()
    for f in rundir.ranks.glob("rank*"):
        if not f.name[4:].isdigit():
            continue
        try:
            info, mtime = json.loads(f.read_text()), f.stat().st_mtime
        except (OSError, ValueError):
            continue
        out[int(f.name[4:])] = (info["state"], info["message"], now - mtime)
    return out


def diagnose(statuses: dict[int, tuple[str, str, float]], world_size: int) -> str:
    """Name the rank(s) that ended the job: a rank that vanished without a word is the likely cause
    (its peers then fail with connection errors), then ranks that reported a failure."""
    silent = [r for r, (s, _, _) in sorted(statuses.items()) if s in ("started", "running")]
    failed = [f"rank {r} failed: {m}" for r, (s, m, _) in sorted(statuses.items()) if s == "failed"]
    parts = [", ".join(f"rank {r}" for r in silent) + " exited without reporting (crashed or was killed)"] \
        if silent else []
    parts += failed
    missing = sorted(set(range(world_size)) - set(statuses))
    if missing:
        parts.append(f"rank(s) {missing} never started")
    return "; then ".join(parts) or "the launcher failed"


def supervise(cmd: list[str], env: dict, rundir: RunDir, world_size: int, launch: LaunchConfig) -> int:
    """Run the launch command; end it when a rank hangs or never starts; name culprits on failure."""
    rank_timeout_s, startup_timeout_s = launch.rank_timeout_s, launch.startup_timeout_s
    shutil.rmtree(rundir.ranks, ignore_errors=True)
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    started, problem = time.monotonic(), None
    while proc.poll() is None:
        time.sleep(0.5)
        statuses = read_statuses(rundir)
        running = {r: age for r, (s, _, age) in statuses.items() if s == "running"}
        if running and max(running.values()) > rank_timeout_s:
            culprit = max(running, key=running.get)
            problem = (f"rank {culprit} stopped responding (no progress for {running[culprit]:.0f} s, "
                       f"rank_timeout_s={rank_timeout_s:g})")
        elif len(statuses) < world_size and time.monotonic() - started > startup_timeout_s:
            missing = sorted(set(range(world_size)) - set(statuses))
            problem = f"rank(s) {missing} did not start within startup_timeout_s={startup_timeout_s:g} s"
        if problem:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    code = proc.returncode
    if problem or code != 0:
        print(f"autocnnp: the job failed: {problem or diagnose(read_statuses(rundir), world_size)}",
              file=sys.stderr, flush=True)
        return code if code > 0 else 1
    return 0
