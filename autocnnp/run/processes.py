"""The processes of a job: started in a session of their own, tied to their parent's life, stopped
together (gracefully, then by force), and signals to the front-end turned into a clean stop.

Open MPI's mpirun puts every rank in a process group of its own, so a job is followed by its
*session*: the launcher is started with ``start_new_session`` and every process it starts, locally,
stays in that session. Each process of the chain also asks the kernel to signal it when its parent
dies (``PR_SET_PDEATHSIG``), so a front-end or launcher killed with SIGKILL still takes the ranks
with it, on every host.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

from ..core.errors import ExitCode, Interrupted
from ..core.processes import die_with_parent

# what stops a run & manage command cleanly; SIGUSR1 is Slurm's warning before the time limit
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def start(cmd: list[str], env: dict[str, str] | None, stdout=None, stderr=None,
          orphaned: int = signal.SIGTERM) -> subprocess.Popen:
    """Start ``cmd`` (with ``env``, or this process's environment; output to ``stdout`` and ``stderr``, or
    ours) as the leader of a new session that gets ``orphaned`` when this process ends."""
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            start_new_session=True, preexec_fn=lambda: die_with_parent(orphaned))


# Open MPI's banners when ranks end (a rank called MPI_Abort, returned non-zero, was killed by a signal):
# run & manage names the cause itself; the count of the other ranks' banners with the advice that follows
# it, the show_help noise of 4.1, and its event library's warning when the connections to other hosts close
# under it
_BANNER_EDGE = "-" * 20
_EXIT_BANNERS = ("MPI_ABORT was invoked", "mpirun noticed that process rank", "Primary job  terminated normally",
                 "mpirun has exited due to process rank")
_KILLED = re.compile(r"mpirun noticed that process rank (\d+) .* exited on signal (\d+)")
_LAUNCHER_NOISE = re.compile(r"ORTE_ERROR_LOG: .* in file \S*show_help\.c|sent help message "
                             r"help-mpi-api\.txt / mpi-abort|Set MCA parameter \"orte_base_help_aggregate\" to 0|"
                             r"^\[warn\] Epoll \w+\(\d+\) on fd \d+ failed")


def forward_stderr(stream, out, mute: threading.Event | None = None,
                   killed: dict[int, int] | None = None) -> threading.Thread:
    """Copy a launcher's stderr to ``out`` as it comes, leaving out Open MPI's banners on ranks that ended
    and its unpack noise (run & manage names the cause; the ranks' own words are in their logs), and
    everything once ``mute`` is set (a job being stopped). The ranks Open MPI saw killed by a signal go
    into ``killed`` (rank -> signal number). Returns the copying thread."""
    def copy() -> None:
        held, in_banner = None, False  # held: a dashed line, until the next one tells whether a banner starts
        for line in iter(stream.readline, b""):
            text = line.decode(errors="replace")
            if mute is not None and mute.is_set():
                held = None
                continue
            if killed is not None and (match := _KILLED.match(text)):
                killed.setdefault(int(match[1]), int(match[2]))
            if in_banner:
                in_banner = not text.startswith(_BANNER_EDGE)
                continue
            if held is not None:
                in_banner = text.startswith(_EXIT_BANNERS)
                out.write("" if in_banner else held)
                held = None
                if in_banner:
                    continue
            if text.startswith(_BANNER_EDGE):
                held = text
            elif not _LAUNCHER_NOISE.search(text):
                out.write(text)
                out.flush()
        out.write(held or "")
        out.flush()

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


def session_processes(sid: int) -> list[int]:
    """The processes of session ``sid`` on this host (zombies included: see :func:`_running`)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry)) == sid:
                    out.append(int(entry))
    return out


def stop_session(proc: subprocess.Popen, grace_s: float) -> int:
    """Stop ``proc`` (a launcher: it passes SIGTERM on to its ranks) and then every process left in its
    session: SIGKILL for what is still there after ``grace_s``. Reaps ``proc``; returns how many processes
    the session held."""
    pids = session_processes(proc.pid)
    with contextlib.suppress(OSError):
        os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _alive(pids, proc):
        time.sleep(0.1)
    for pid in session_processes(proc.pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5.0  # SIGKILL is final, but it takes the kernel a moment
    while time.monotonic() < deadline and any(_running(pid) for pid in session_processes(proc.pid)):
        time.sleep(0.05)
    return len(pids)


def _alive(pids: list[int], proc: subprocess.Popen) -> bool:
    proc.poll()
    return any(_running(pid) for pid in pids)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # zombies have ended
    except OSError:
        return False


def end_on_stop_signals(exit_code, signals=STOP_SIGNALS):
    """For the rest of this process's life (a command's, outside :func:`interruptible`: its start, and its exit once
    the command returned, what it started stopped), ``signals`` end it at once with 128+N and one line, never a
    traceback; and once its exit functions ran it ends with ``exit_code()`` before the interpreter tears its
    modules down (seconds, with torch and gRPC loaded), where Python gives the signals their default action back
    (a Ctrl-C there killed it: -2); a process that loaded MPI (mpi4py: MPI_Finalize comes last) tears them down,
    ignoring the signals. Signals ignored now stay so (``nohup``). Returns ``exiting()``, to call when
    the command returned: a signal Python's exit holds back from then on (while it joins the threads left) still
    ends the process so."""
    caught: list[int] = []  # the read end of the signals' wakeup pipe, from exiting() on

    def handler(signum, frame):
        os.write(2, f"autocnnp: {Interrupted(signum)}\n".encode())
        os._exit(ExitCode.INTERRUPTED + signum)

    def exiting() -> None:
        read, write = os.pipe()
        for fd in (read, write):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        caught.append(read)

    def end() -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(OSError):
            for signum in os.read(caught[0], 64) if caught else b"":
                if signum in signals:
                    handler(signum, None)
        if "mpi4py.MPI" in sys.modules:  # a rank's MPI_Finalize comes after the teardown: it runs, the signals ignored
            for s in signals:
                signal.signal(s, signal.SIG_IGN)
            return
        os._exit(exit_code())

    for s in signals:
        if signal.getsignal(s) is not signal.SIG_IGN:
            signal.signal(s, handler)
    atexit.register(end)  # registered first, run last
    return exiting


@contextlib.contextmanager
def interruptible(signals=STOP_SIGNALS):
    """Turn ``signals`` into :class:`Interrupted` in the main thread for the block (a second one while the
    first is handled is ignored), so that ``finally`` blocks stop whatever the block started. A signal
    ignored when the block starts stays ignored (``nohup autocnnp run`` survives the logout's SIGHUP)."""
    def handler(signum, frame):
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signals if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
