"""Helpers shared by the benchmark scripts: start N ranks of a script, print a table."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from autocnnp.core.text import text_table

ROOT = Path(__file__).resolve().parents[1]


def launcher_command(ranks: int, launcher: str = "auto") -> tuple[list[str], dict[str, str]]:
    """The prefix that starts ``ranks`` copies of a Python command, and its environment.

    ``mpirun`` gets the flags autocnnp's own launcher uses (``--bind-to none --oversubscribe``);
    ``torchrun`` is the fall-back where Open MPI is missing; ``inplace`` (one rank) starts nothing.
    """
    env = dict(os.environ)
    if launcher == "auto":
        launcher = "inplace" if ranks == 1 else ("mpirun" if shutil.which("mpirun") else "torchrun")
    if launcher == "inplace":
        if ranks != 1:
            raise SystemExit("--launcher inplace runs one rank only")
        return [sys.executable], env
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"], env
    cmd = ["mpirun", "-np", str(ranks), "--bind-to", "none", "--oversubscribe"]
    for name in ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "OMP_NUM_THREADS"):
        if name in env:
            cmd += ["-x", name]
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return cmd + [sys.executable], env


def run_ranks(script: Path, ranks: int, args: list[str], launcher: str = "auto", log: Path | None = None,
              timeout: float | None = None) -> int:
    """Run ``script args`` as ``ranks`` ranks and return the exit code. Their output goes to ``log``
    (printed, last 60 lines, if they fail), or to ours without one."""
    prefix, env = launcher_command(ranks, launcher)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [*prefix, str(script), *args]
    if log is None:
        return subprocess.run(cmd, env=env, cwd=ROOT, timeout=timeout).returncode
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=timeout, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        print("\n".join(Path(log).read_text(errors="replace").splitlines()[-60:]), file=sys.stderr)
    return rc


def ranks_result(script: Path, ranks: int, argv: list[str], launcher: str, name: str,
                 folder: Path | None = None) -> dict | None:
    """Re-run ``script`` as ``ranks`` ranks with ``--worker FOLDER`` appended and return the
    ``result.json`` its rank 0 writes there (None, with a message, if the ranks failed). FOLDER is
    ``folder`` (the caller's, holding its job) or a temporary one, removed afterwards."""
    import json
    import tempfile

    work = folder or Path(tempfile.mkdtemp(prefix=f"autocnnp-{name}-"))
    try:
        rc = run_ranks(script, ranks, [*argv, "--worker", str(work)], launcher, log=work / "ranks.log")
        if rc != 0 or not (work / "result.json").exists():
            print(f"{name}: the ranks failed (exit code {rc}); see the output above", file=sys.stderr)
            return None
        return json.loads((work / "result.json").read_text())
    finally:
        if folder is None:
            shutil.rmtree(work, ignore_errors=True)


def init_process_group(backend: str, world) -> None:
    """Join the default process group (rendezvous as autocnnp's: launcher variables, else rank 0 picks a
    free port and sends it over MPI), unless this process already joined one."""
    import datetime
    import os
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    elif world.world_size == 1:
        addr, port = "127.0.0.1", 0
    else:
        from mpi4py import MPI

        here = None
        if MPI.COMM_WORLD.rank == 0:
            try:
                ip = socket.gethostbyname(socket.gethostname())
            except OSError:
                ip = "127.0.0.1"
            with socket.socket() as s:
                s.bind(("", 0))
                here = (ip, s.getsockname()[1])
        addr, port = MPI.COMM_WORLD.bcast(here, root=0)
    if port == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=world.rank, world_size=world.world_size,
                            timeout=datetime.timedelta(seconds=300))


def measured(cmd: list[str], pythonpath: str, cwd: Path) -> tuple[float, int, int, str]:
    """Run ``cmd`` with ``PYTHONPATH=pythonpath`` (another checkout's code, say) in its own process group:
    ``(seconds, peak resident bytes (wait4's ru_maxrss), exit code, standard output and error)``; the group is
    killed if this is interrupted."""
    import tempfile
    import time

    env = {**os.environ, "PYTHONPATH": pythonpath}
    with tempfile.TemporaryFile() as output:
        start = time.perf_counter()
        process = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            os.killpg(process.pid, 9)
            process.wait()
            raise
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read().decode(errors="replace")
    return seconds, usage.ru_maxrss * 1024, process.returncode, text


def table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    return "\n".join(line.rstrip() for line in text_table(head, rows, rule=True).splitlines())
