"""Several hosts: check a job's hostfile before mpirun starts anything (torch-free).

mpirun starts the ranks of the other hosts through a launch agent: passwordless ``ssh`` by default,
or the ``<cluster>`` property ``launch_agent`` (any program called as ``AGENT HOST COMMAND...``,
passed to Open MPI as ``plm_rsh_agent``). Every host must see the job file, the files it names and
the Python environment at the same paths: a shared filesystem, or ``autocnnp deploy`` to a folder
that every host mounts. Each problem found here is one JobError naming the host.
"""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..core.errors import JobError, Location
from ..core.files import read_input
from .config import LaunchConfig
from .job import Job

REACH_TIMEOUT_S = 20.0
SHARED_HINT = ("every host must see the job folder and the Python environment at the same paths: use a shared "
               "filesystem, or `autocnnp deploy JOB.xml --to /shared/dir --with-package` and run the deployed job")


def parse_hostfile(path: Path, where: Location | None = None) -> list[tuple[str, int, int]]:
    """(host, slots, line) per line of an Open MPI hostfile (``host [slots=N] [max_slots=M]``, ``#`` comments);
    a file that cannot be read is a JobError at ``where`` (the job's hostfile property)."""
    hosts = []
    text = read_input(Path(path), where or Path(path), "hostfile").decode("utf-8", "replace")
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#")[0].split()
        if not words:
            continue
        slots = 1
        for word in words[1:]:
            key, _, value = word.partition("=")
            if key in ("slots", "cpu", "count") and value.isdigit():
                slots = int(value)
        hosts.append((words[0], slots, number))
    return hosts


def _local_addresses() -> set[str]:
    addrs = {"127.0.0.1", "::1"}
    try:
        import psutil

        for infos in psutil.net_if_addrs().values():
            addrs.update(i.address.split("%")[0] for i in infos if i.family in (socket.AF_INET, socket.AF_INET6))
    except Exception:  # psutil missing or restricted: the loopback and the host name still count
        pass
    return addrs


def _resolve(host: str) -> set[str] | None:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return None


def agent_command(launch: LaunchConfig) -> list[str]:
    """The launch agent as a command list (ssh that never prompts, unless the job names another agent)."""
    if launch.launch_agent:
        return shlex.split(launch.launch_agent)
    return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(REACH_TIMEOUT_S // 2)}"]


def _remote(agent: list[str], host: str, command: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([*agent, host, command], capture_output=True, text=True, timeout=REACH_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(agent, 124, "", f"no answer within {REACH_TIMEOUT_S:g} s")


def check_hosts(job: Job, keep_going: bool = False) -> list[tuple[str, int]]:
    """The hostfile's ``(host, slots)`` that resolve, answer through the launch agent and see the job file
    and this Python at the same paths. A host that does not is a JobError, or with ``keep_going`` is left
    out and named on stderr."""
    path, here = job.launch.hostfile, job.where("hostfile")
    hosts = parse_hostfile(path, here)
    if not hosts:
        raise JobError(here, f"hostfile {path} lists no hosts", "write one host per line, e.g. `node1 slots=2`")
    local, remote, problems = _local_addresses(), [], []
    for host, _, line in hosts:
        addrs = _resolve(host)
        if addrs is None:
            problems.append((host, f"host '{host}' (line {line} of {path}) does not resolve to an address"))
        elif not addrs & local and host not in (socket.gethostname(), "localhost"):
            remote.append(host)
    if remote:
        problems += _remote_problems(job, remote)
    if problems and not keep_going:
        host, text = problems[0]
        more = f" ({len(problems) - 1} more host(s) fail too: {', '.join(h for h, _ in problems[1:])})" \
            if len(problems) > 1 else ""
        hint = (SHARED_HINT if "does not see" in text else "fix the name, or add it to DNS or /etc/hosts on this "
                "machine" if "does not resolve" in text else
                "mpirun starts remote ranks over passwordless ssh: set up keys (ssh-copy-id HOST; test with "
                "ssh -o BatchMode=yes HOST true), or name another launch agent in <property name=\"launch_agent\">")
        raise JobError(here, text + more, hint)
    for _, text in problems:
        print(f"autocnnp: note: {text}; left out", file=sys.stderr, flush=True)
    gone = {h for h, _ in problems}
    return [(host, slots) for host, slots, _ in hosts if host not in gone]


def _remote_problems(job: Job, remote: list[str]) -> list[tuple[str, str]]:
    """(host, problem) of the remote hosts the launch agent cannot reach or that lack the job's files."""
    agent = agent_command(job.launch)
    if shutil.which(agent[0]) is None:
        raise JobError(job.where("launch_agent"), f"the launch agent '{agent[0]}' that reaches other hosts is "
                       "not installed", "install openssh-client, or set <property name=\"launch_agent\"> to a "
                       "program called as AGENT HOST COMMAND")
    probe = f"test -r {shlex.quote(str(job.spec.file))} && test -x {shlex.quote(sys.executable)}"

    def check(host: str) -> tuple[str, str] | None:
        reach = _remote(agent, host, "true")
        if reach.returncode != 0:
            lines = [ln for ln in (reach.stderr or reach.stdout).splitlines() if ln.strip()]
            return host, (f"cannot reach host '{host}' with `{shlex.join(agent)}`: "
                          f"{lines[-1].strip() if lines else f'exit code {reach.returncode}'}")
        if _remote(agent, host, probe).returncode != 0:
            return host, (f"host '{host}' does not see the job file {job.spec.file} or the Python "
                          f"{sys.executable} (no shared filesystem?)")
        return None

    with ThreadPoolExecutor(max_workers=min(16, len(remote))) as pool:
        return [p for p in pool.map(check, remote) if p]
