"""Faults injected on purpose, with real processes: what run & manage does, how fast, what it says, the exit
code, that no process of the job is left, and that the same command resumes.

Every process a test starts carries a tag in its environment (``AUTOCNNP_FAULT_TAG``); mpirun passes it
on to the ranks, so "nothing is left" is checked over every process of the machine, re-parented or not.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from jobfiles import QUIET, TINY_UNET, checkpoint_plugin, strategy_module, synthetic_data, write_job

from autocnnp.core.errors import ExitCode
from autocnnp.core.rundir import RunDir
from autocnnp.run import manifest
from autocnnp.run.deploy import job_tree
from autocnnp.run.job import load_job
from autocnnp.run.launch import build_command

TAG = "AUTOCNNP_FAULT_TAG"
GRACE_S = 5
DATA = synthetic_data(16, 4, size=16)
HYPER = dict(minibatch_size=2, end_epoch=400, lr=0.05, optimiser="sgd")


def tiny_job(tmp_path: Path, cluster: str = "", actions: str | None = None, name: str = "job.xml", **hyper) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    extra = QUIET + f'<cluster><property name="stop_grace_s">{GRACE_S}</property>{cluster}</cluster>'
    return write_job(tmp_path / name, output="out", arch=TINY_UNET, data=DATA, actions=actions,
                     hyper={**HYPER, **hyper}, extra=extra)


# --------------------------------------------------------------------------- processes of a job


def tagged(tag: str) -> list[int]:
    """Live (not zombie) processes carrying ``tag`` in their environment."""
    needle = f"{TAG}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class Launch:
    """``autocnnp run`` started as a user would, in a session of its own; output into files."""

    def __init__(self, job: Path, *args: str, tmp_path: Path, ignore=()):
        self.tag = uuid.uuid4().hex
        n = len(list(tmp_path.glob("stderr-*")))
        self.out, self.err = tmp_path / f"stdout-{n}", tmp_path / f"stderr-{n}"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "autocnnp", "run", str(job), *args], stdout=out,
                                         stderr=err, env={**os.environ, TAG: self.tag}, start_new_session=True,
                                         preexec_fn=lambda: [signal.signal(s, signal.SIG_IGN) for s in ignore])

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def gone_within(self, seconds: float) -> list[int]:
        """Processes of this launch still alive after ``seconds`` (empty: all gone)."""
        deadline = time.monotonic() + seconds
        while (left := tagged(self.tag)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [(pid, comm(pid)) for pid in left]

    def kill_all(self) -> None:
        for pid in tagged(self.tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def launches():
    """Start launches; whatever a failing test leaves is killed afterwards."""
    started: list[Launch] = []

    def start(job: Path, *args: str, tmp_path: Path, ignore=()) -> Launch:
        launch = Launch(job, *args, tmp_path=tmp_path, ignore=ignore)
        started.append(launch)
        return launch

    yield start
    for launch in started:
        launch.kill_all()


def epochs(out: Path) -> list[int]:
    """The epochs metrics.csv holds (numbered from 1)."""
    try:
        with open(out / "metrics.csv") as f:
            return [int(row["epoch"]) for row in csv.DictReader(f)]
    except (OSError, ValueError, KeyError):
        return []


def wait_for_epochs(out: Path, n: int, launch: Launch, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(epochs(out)) < n:
        assert launch.proc.poll() is None, f"the run ended early ({launch.proc.returncode}): {launch.stderr}"
        assert time.monotonic() < deadline, f"no {n} epochs within {timeout} s: {launch.stderr}"
        time.sleep(0.1)


def latest_epoch(out: Path) -> int:
    """The epoch the latest checkpoint continues from (it loads)."""
    name = (out / "checkpoints" / "latest").read_text().strip()
    return torch.load(out / "checkpoints" / name, weights_only=False)["epoch"]


def training(tmp_path: Path, launches) -> tuple[Path, Path, Launch]:
    """(job, output folder, launch) of a long run that has trained two epochs."""
    job = tiny_job(tmp_path)
    run = launches(job, tmp_path=tmp_path)
    wait_for_epochs(tmp_path / "out", 2, run)
    return job, tmp_path / "out", run


def resume_and_check(job: Path, out: Path, launches, tmp_path: Path) -> None:
    """The same command (two more epochs) resumes from ``latest`` and the curve goes on without a gap."""
    start = latest_epoch(out)
    again = launches(job, "--set", f"hyperparameters.end_epoch={start + 2}", tmp_path=tmp_path)
    assert again.wait() == 0, again.stderr
    assert f"resumed from {out / 'checkpoints'}" in (out / "logs" / "rank0.log").read_text()
    assert epochs(out) == list(range(1, start + 3))


# --------------------------------------------------------------------------- stopping the front-end


@pytest.mark.ranks
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_to_the_front_end_stops_every_rank(tmp_path, launches, sig):
    job, out, run = training(tmp_path, launches)
    ranks = [pid for pid in tagged(run.tag) if comm(pid) not in ("mpirun", "tee")]
    assert len(ranks) >= 3  # the front-end and two ranks
    sent = time.monotonic()
    run.proc.send_signal(sig)
    assert run.wait(GRACE_S + 20) == ExitCode.INTERRUPTED + sig
    took = time.monotonic() - sent
    assert run.gone_within(2) == []
    assert took < GRACE_S + 5, took
    assert run.stderr.splitlines()[-1] == (f"autocnnp: interrupted by {sig.name}: stopped 2 rank(s); the same "
                                           "command resumes from the latest checkpoint")
    assert "Traceback" not in run.stderr
    assert not list((out / "checkpoints").glob(".*.tmp"))
    print(f"{sig.name}: every process gone {took:.1f} s after the signal")
    resume_and_check(job, out, launches, tmp_path)
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["rank0.log", "rank1.log"]


DEAF_RANK = '''import os
import signal


def Deaf(epoch, metrics, state):
    """Rank 1 ignores SIGTERM from its first epoch's end on."""
    if os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
'''


@pytest.mark.ranks
def test_a_rank_that_ignores_sigterm_is_killed_after_the_grace_quietly(tmp_path, launches):
    (tmp_path / "deaf.py").write_text(DEAF_RANK)
    job = tiny_job(tmp_path, actions=strategy_module(extra=checkpoint_plugin("Deaf", "deaf.py")))
    run = launches(job, tmp_path=tmp_path)
    wait_for_epochs(tmp_path / "out", 2, run)
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(GRACE_S + 20) == ExitCode.INTERRUPTED + signal.SIGINT
    assert time.monotonic() - sent < GRACE_S + 5
    assert run.gone_within(2) == []
    assert "Traceback" not in run.stderr and run.stderr.splitlines()[-1].startswith("autocnnp: interrupted by SIGINT")


@pytest.mark.ranks
def test_sigkill_of_the_front_end_takes_the_ranks_with_it(tmp_path, launches):
    job, out, run = training(tmp_path, launches)
    run.proc.kill()
    run.wait()
    assert run.gone_within(GRACE_S + 10) == []
    again = launches(job, "--set", f"hyperparameters.end_epoch={latest_epoch(out) + 1}", tmp_path=tmp_path)
    assert again.wait() == 0, again.stderr
    assert f"took over the lock of pid {run.proc.pid} on host" in again.stderr


@pytest.mark.ranks
def test_sigkill_of_mpirun_names_the_launcher(tmp_path, launches):
    job, out, run = training(tmp_path, launches)
    mpirun = [pid for pid in tagged(run.tag) if comm(pid) == "mpirun"]
    assert len(mpirun) == 1
    os.kill(mpirun[0], signal.SIGKILL)
    assert run.wait(30) == ExitCode.FAILED
    assert run.gone_within(5) == []
    assert run.stderr.splitlines()[-1] == ("autocnnp: the job failed: the launcher mpirun was killed by SIGKILL; "
                                           "its ranks were stopped with it")
    resume_and_check(job, out, launches, tmp_path)


# --------------------------------------------------------------------------- blame


def status(state: str, message: str = "", time: float = 0.0) -> dict:
    return {"state": state, "message": message, "time": time, "age": 0.0}


LOST = "RuntimeError: Connection reset by peer"


@pytest.mark.parametrize(("statuses", "named"), [
    ({0: status("running"), 1: status("failed", "ValueError: bad", 1.0)}, "rank 1 failed: ValueError: bad"),  # MPI_Abort
    ({0: status("failed", LOST, 2.0), 1: status("terminated", "stopped by SIGTERM", 1.0)},
     "rank 1 was stopped by SIGTERM from outside the job"),
    ({0: status("terminated", "stopped by SIGTERM", 1.0), 1: status("terminated", "stopped by SIGTERM", 1.0)},
     "every rank was stopped by a signal autocnnp did not send (stopped by SIGTERM); the launcher mpirun exited "
     "with code 1: was the launcher signalled?"),
    ({0: status("failed", LOST, 2.0), 1: status("running")}, "rank 1 exited without reporting (crashed or was killed)"),
    ({}, "no rank started: the launcher mpirun exited with code 1 (its message is above)"),
    ({0: status("failed", LOST, 2.0), 1: status("done", "", 1.0)}, f"rank 0 failed: {LOST}"),
    ({0: status("running")}, "rank 0 exited without reporting (crashed or was killed)"),
    ({0: status("done")}, "1 rank(s) never started (1)"),
], ids=["abort-victim", "one-rank-signalled", "launcher-signalled", "crash", "none-started", "lost-peer", "vanished",
        "missing"])
def test_blame_names_the_cause_not_its_victims(statuses, named):
    from autocnnp.run.supervise import diagnose

    assert diagnose(statuses, 2, "the launcher mpirun", 1) == named


def rank_pid(launch: Launch, rank: int) -> int:
    """The pid of ``rank`` of a launch (the training process, not its log tee)."""
    for pid in tagged(launch.tag):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ and comm(pid).startswith("python"):
            return pid
    raise AssertionError(f"no rank {rank} among {[(p, comm(p)) for p in tagged(launch.tag)]}")


@pytest.mark.ranks
def test_a_rank_signalled_from_outside_is_named(tmp_path, launches):
    job, out, run = training(tmp_path, launches)
    os.kill(rank_pid(run, 1), signal.SIGTERM)
    assert run.wait(60) == ExitCode.FAILED
    assert run.gone_within(5) == []
    assert run.stderr.splitlines()[-1] == "autocnnp: the job failed: rank 1 was stopped by SIGTERM from outside the job"


KILLED_IN_CHECKPOINT = '''import os
import signal


def Killed(epoch, metrics, state):
    """Rank 1 is killed (SIGKILL) while the checkpoint of the second epoch is written."""
    if epoch == 1 and os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.mark.ranks
def test_a_rank_killed_during_a_checkpoint_is_one_line_on_the_console(tmp_path, launches):
    """Neither Open MPI's banners nor the surviving peer's lost-connection traceback reach the console: one
    line names the rank and the signal; the peer's words are in its log."""
    (tmp_path / "killed.py").write_text(KILLED_IN_CHECKPOINT)
    job = tiny_job(tmp_path, actions=strategy_module(extra=checkpoint_plugin("Killed", "killed.py")), end_epoch=4)
    run = launches(job, tmp_path=tmp_path)
    assert run.wait() == ExitCode.FAILED
    assert run.gone_within(5) == []
    assert run.stderr == "autocnnp: the job failed: rank 1 was killed by SIGKILL\n"
    if json.loads((tmp_path / "out" / ".ranks" / "rank0").read_text())["state"] == "failed":  # it lost its peer
        log = (tmp_path / "out" / "logs" / "rank0.log").read_text()  # before the launcher stopped it
        assert "Traceback (most recent call last)" in log and "autocnnp: rank 0 failed: " in log


@pytest.mark.ranks
def test_nohup_keeps_a_run_through_the_logout(tmp_path, launches):
    """A SIGHUP ignored when `autocnnp run` starts (nohup) stays ignored; the run trains on."""
    job = tiny_job(tmp_path)
    run = launches(job, tmp_path=tmp_path, ignore=(signal.SIGHUP,))
    wait_for_epochs(tmp_path / "out", 1, run)
    run.proc.send_signal(signal.SIGHUP)
    seen = len(epochs(tmp_path / "out"))
    wait_for_epochs(tmp_path / "out", seen + 2, run)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(GRACE_S + 20) == ExitCode.INTERRUPTED + signal.SIGTERM
    assert run.gone_within(2) == []


def test_an_interrupt_during_the_data_check_is_an_interrupt_and_leaves_no_verdict(tmp_path, monkeypatch):
    """Ctrl-C while the front-end checks the data ends the command (130); it is not reported as a corrupt
    file, and no verdict is cached for the next run."""
    import nibabel as nib

    from autocnnp.core.errors import Interrupted
    from autocnnp.data import checks
    from autocnnp.data.synth import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "data", "atrium", cases=3, shape=(8, 8, 6), test_cases=0)

    def interrupted(*args, **kwargs):
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(nib, "load", interrupted)
    with pytest.raises(Interrupted):
        checks.validate_once(root, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("validated-*"))


# --------------------------------------------------------------------------- a run owns its folder


@pytest.mark.ranks
def test_a_second_run_of_the_same_output_is_refused_and_harms_nothing(cli, tmp_path, launches):
    job = tiny_job(tmp_path, end_epoch=12)
    out = tmp_path / "out"
    first = launches(job, tmp_path=tmp_path)
    wait_for_epochs(out, 1, first)
    rc, _, err = cli("run", job)
    assert rc == 2 and err.count("\n") == 1
    assert f"the output folder {out} is in use by another run: pid {first.proc.pid} on host " in err
    assert "Hint: wait for it to end or stop it, or give this run another <output>" in err
    assert first.wait() == 0, first.stderr
    assert epochs(out) == list(range(1, 13))  # every epoch once, none of them disturbed


@pytest.mark.ranks
def test_a_diverged_run_says_so_once_per_rank_without_the_launchers_banner(tmp_path, launches):
    run = launches(tiny_job(tmp_path, end_epoch=5, lr=1e8), tmp_path=tmp_path)
    assert run.wait() == ExitCode.DIVERGED, run.stderr
    lines = run.stderr.splitlines()
    assert 1 <= len(lines) <= 2 and all(line.startswith("autocnnp: rank ") and "training diverged" in line
                                        for line in lines), run.stderr
    assert run.gone_within(2) == []


OPEN_MPI_HELP = b"""--------------------------------------------------------------------------
A requested component was not found, or was unable to be opened.
--------------------------------------------------------------------------
"""
OPEN_MPI_ABORT = b"""[vm:01966] [[27472,0],0] ORTE_ERROR_LOG: Out of resource in file ../../../orte/util/show_help.c at line 507
[vm:01479] [[26937,0],0] ORTE_ERROR_LOG: Data unpack would read past end of buffer in file orte/util/show_help.c at line 501
--------------------------------------------------------------------------
MPI_ABORT was invoked on rank 0 in communicator MPI_COMM_WORLD
with errorcode 3.

NOTE: invoking MPI_ABORT causes Open MPI to kill all MPI processes.
--------------------------------------------------------------------------
[vm:01678] 1 more process has sent help message help-mpi-api.txt / mpi-abort
[vm:01678] Set MCA parameter "orte_base_help_aggregate" to 0 to see all help / error messages
"""


def test_the_launchers_abort_banner_is_left_out_and_its_other_messages_kept():
    import io

    from autocnnp.run.processes import forward_stderr

    out = io.StringIO()
    forward_stderr(io.BytesIO(b"autocnnp: rank 1: why\n" + OPEN_MPI_ABORT + OPEN_MPI_HELP + b"last\n"), out).join(5)
    assert out.getvalue() == "autocnnp: rank 1: why\n" + OPEN_MPI_HELP.decode() + "last\n"


OPEN_MPI_KILLED = b"""--------------------------------------------------------------------------
Primary job  terminated normally, but 1 process returned
a non-zero exit code. Per user-direction, the job has been aborted.
--------------------------------------------------------------------------
--------------------------------------------------------------------------
mpirun noticed that process rank 1 with PID 0 on node vm exited on signal 11 (Segmentation fault).
--------------------------------------------------------------------------
"""


def test_the_launchers_banners_on_a_killed_rank_become_its_name_and_signal():
    import io

    from autocnnp.run.processes import forward_stderr
    from autocnnp.run.supervise import diagnose

    out, killed = io.StringIO(), {}
    forward_stderr(io.BytesIO(b"epoch 1\n" + OPEN_MPI_KILLED + OPEN_MPI_HELP), out, killed=killed).join(5)
    assert out.getvalue() == "epoch 1\n" + OPEN_MPI_HELP.decode() and killed == {1: signal.SIGSEGV}
    statuses = {0: status("failed", LOST, 2.0), 1: status("running")}
    assert diagnose(statuses, 2, "the launcher mpirun", 1, killed) == "rank 1 was killed by SIGSEGV"


@pytest.mark.ranks
def test_a_mistyped_best_metric_stops_the_run_before_training(tmp_path, launches):
    run = launches(tiny_job(tmp_path, end_epoch=3), "--set", "checkpoint.best_metric=dice_fgg", tmp_path=tmp_path)
    assert run.wait() == ExitCode.BAD_INPUT, run.stderr
    assert "best_metric 'dice_fgg' is not a metric this run reports. Hint: did you mean 'dice_fg'" in run.stderr
    assert "Traceback" not in run.stderr and epochs(tmp_path / "out") == []
    assert run.gone_within(2) == []


# --------------------------------------------------------------------------- restart


CRASH_ONCE = '''import os
from pathlib import Path

MARK = Path(__file__).with_name("crashed")


def CrashOnce(epoch, metrics, state):
    """Rank 1 fails at the end of the third epoch, the first time only."""
    if epoch == 2 and os.environ.get("OMPI_COMM_WORLD_RANK") == "1" and not MARK.exists():
        MARK.write_text("once")
        raise RuntimeError("injected failure")
'''


@pytest.mark.ranks
def test_max_restarts_restarts_a_failed_job_from_its_checkpoint(tmp_path, launches):
    (tmp_path / "crash.py").write_text(CRASH_ONCE)
    actions = strategy_module(extra=checkpoint_plugin("CrashOnce", "crash.py"))
    job = tiny_job(tmp_path, actions=actions, end_epoch=5,
                   cluster='<property name="max_restarts">2</property><property name="restart_backoff_s">0.5</property>')
    run = launches(job, tmp_path=tmp_path)
    assert run.wait() == 0, run.stderr
    out = tmp_path / "out"
    assert "rank 1 failed: RuntimeError: injected failure" in run.stderr
    assert "autocnnp: restart 1 of 2 in 0.5 s from the latest checkpoint (after: rank 1 failed: RuntimeError: " \
           "injected failure" in run.stderr
    assert epochs(out) == list(range(1, 6))
    record = manifest.read(RunDir(out))
    assert [r["attempt"] for r in record["restarts"]] == [1] and "injected failure" in record["restarts"][0]["after"]
    assert [i["status"] for i in record["invocations"]] == ["failed", "completed"]
    assert run.gone_within(2) == []


CRASH_AND_LOSE_A_SLOT = CRASH_ONCE.replace('MARK.write_text("once")', 'MARK.write_text("once")\n        '
                                           'MARK.with_name("hosts").write_text("localhost slots=1\\n")')


@pytest.mark.ranks
def test_a_restart_whose_checks_fail_is_a_failure_on_record(tmp_path, launches):
    (tmp_path / "crash.py").write_text(CRASH_AND_LOSE_A_SLOT)
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    actions = strategy_module(extra=checkpoint_plugin("CrashOnce", "crash.py"))
    job = tiny_job(tmp_path, actions=actions, end_epoch=5, cluster='<property name="hostfile">hosts</property>'
                   '<property name="max_restarts">2</property><property name="restart_backoff_s">0.5</property>')
    run = launches(job, tmp_path=tmp_path)
    assert run.wait() == ExitCode.FAILED, run.stderr
    last = run.stderr.splitlines()[-1]
    assert last.startswith("autocnnp: restart 1 could not start: ") and "more ranks than the 1 slots" in last, last
    record = manifest.read(RunDir(tmp_path / "out"))
    assert record["status"] == "failed" and "restart 1 could not start" in record["invocations"][-1]["message"]
    assert [r["attempt"] for r in record["restarts"]] == [1]
    assert run.gone_within(2) == []


@pytest.mark.ranks
def test_min_ranks_goes_on_without_a_host_that_is_gone(tmp_path, launches):
    agent = tmp_path / "agent"
    agent.write_text("#!/bin/sh\necho \"ssh: connect to host $1 port 22: No route to host\" >&2\nexit 255\n")
    agent.chmod(0o755)
    (tmp_path / "hosts").write_text("localhost slots=1\n192.0.2.7 slots=1\n")  # TEST-NET: never routed
    cluster = (f'<property name="hostfile">hosts</property><property name="launch_agent">{agent}</property>'
               '<property name="min_ranks">1</property>')
    job = tiny_job(tmp_path, cluster=cluster, end_epoch=2)
    run = launches(job, tmp_path=tmp_path)
    assert run.wait() == 0, run.stderr
    assert "note: cannot reach host '192.0.2.7'" in run.stderr
    assert "going on with 1 rank(s) on 1 host(s) that answer (parallelism-degree 2, min_ranks 1)" in run.stderr
    assert manifest.read(RunDir(tmp_path / "out"))["world"]["size"] == 1
    assert epochs(tmp_path / "out") == [1, 2]


def test_min_ranks_is_a_floor(cli, tmp_path, nothing_starts):
    agent = tmp_path / "agent"
    agent.write_text("#!/bin/sh\nexit 255\n")
    agent.chmod(0o755)
    (tmp_path / "hosts").write_text("192.0.2.7 slots=2\n192.0.2.8 slots=2\n")
    cluster = (f'<property name="hostfile">hosts</property><property name="launch_agent">{agent}</property>'
               '<property name="min_ranks">1</property>')
    rc, _, err = cli("run", tiny_job(tmp_path, cluster=cluster))
    assert rc == 2 and "the hosts that answer offer 0 slot(s), fewer than min_ranks=1" in err


# --------------------------------------------------------------------------- bad input: one line, nothing starts


def refused(cli, *argv) -> str:
    rc, out, err = cli(*argv)
    assert rc == 2 and err.startswith("autocnnp: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("kind", ["folder", "fifo", "device", "loop", "long"])
def test_a_job_file_that_is_no_file(cli, tmp_path, kind):
    path = {"folder": tmp_path, "device": Path("/dev/zero"), "loop": tmp_path / "loop",
            "fifo": tmp_path / "fifo", "long": tmp_path / ("x" * 5000 + ".xml")}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    if kind == "loop":
        os.symlink(path, path)
    err = refused(cli, "validate", path)
    assert {"folder": "is a folder, not a file", "fifo": "is a FIFO, not a file",
            "device": "is a device or socket, not a file", "loop": "loops through symbolic links",
            "long": "too long"}[kind] in err
    assert len(err) < 600


@pytest.mark.parametrize("kind", ["folder", "fifo", "device"])
def test_a_hostfile_that_is_no_file(cli, tmp_path, nothing_starts, kind):
    path = {"folder": tmp_path / "hosts.d", "fifo": tmp_path / "hosts", "device": Path("/dev/zero")}[kind]
    if kind == "folder":
        path.mkdir()
    if kind == "fifo":
        os.mkfifo(path)
    job = tiny_job(tmp_path, cluster=f'<property name="hostfile">{path}</property>')
    line = next(i for i, t in enumerate(job.read_text().splitlines(), 1) if 'name="hostfile"' in t)
    err = refused(cli, "run", job)
    assert err.startswith(f"autocnnp: {job}:{line}:") and f"the hostfile {path} is a" in err
    # refused when the job is read, by every command: a process of its own each, as a FIFO read could block
    for command in (["validate"], ["plan"], ["submit", "--dry-run"], ["deploy", "--dry-run", "--to", tmp_path / "d"]):
        r = subprocess.run([sys.executable, "-m", "autocnnp", command[0], job, *command[1:]], capture_output=True,
                           text=True, timeout=60)
        assert (r.returncode, r.stdout, r.stderr) == (2, "", err), command


ARCH = ("import torch.nn as nn\n\n\ndef build(in_channels, num_classes):\n    {note}\n"
        "    return nn.Conv2d(in_channels, num_classes, 1)\n")


def test_user_code_in_its_declared_encoding(cli, tmp_path):
    (tmp_path / "net.py").write_bytes(b"# -*- coding: latin-1 -*-\n" + ARCH.format(note="'r\xe9seau'").encode("latin-1"))
    job = write_job(tmp_path / "job.xml", arch='<CNN_archi><path>net.py</path></CNN_archi>', data=DATA)
    assert cli("validate", job)[0] == 0 and cli("plan", job)[0] == 0
    (tmp_path / "net.py").write_bytes(ARCH.format(note="'r\xe9seau'").encode("latin-1"))  # no declaration
    err = refused(cli, "validate", job)
    assert f"{tmp_path / 'net.py'}:" in err and "syntax error in architecture file" in err and "utf-8" in err


def test_a_utf16_job_file_is_read_and_recorded(cli, tmp_path):
    text = tiny_job(tmp_path).read_text().replace('encoding="UTF-8"', 'encoding="UTF-16"')
    job = tmp_path / "utf16.xml"
    job.write_bytes(text.encode("utf-16"))
    assert cli("validate", job)[0] == 0
    record = manifest.job_record(load_job(job).spec)
    assert "<system_config>" in record["text"] and record["sha256"] is not None


@pytest.mark.parametrize("value", ["1_0", "\uff12", "2\u0660"])
def test_numbers_are_plain_ascii(cli, tmp_path, value):
    job = tiny_job(tmp_path)
    err = refused(cli, "validate", job, "--set", f"hyperparameters.minibatch_size={value}")
    assert "minibatch_size must be an integer" in err


def test_a_minibatch_larger_than_a_rank_shard(cli, tmp_path, nothing_starts):
    err = refused(cli, "run", tiny_job(tmp_path, minibatch_size=64))
    assert "each rank gets 8 of the 16 training samples, fewer than one minibatch of 64" in err
    assert "Hint: lower minibatch_size to 8 or less" in err
    assert not (tmp_path / "out").exists()  # a refused run leaves no output folder behind (no lock, no cache)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "existing-folder"])
def test_a_signal_during_the_data_check_leaves_nothing_the_run_created(cli, tmp_path, nothing_starts, monkeypatch,
                                                                       sig, existing):
    """Ctrl-C or SIGTERM while the front-end checks (and caches) the data: the folders, lock and cache the run
    created are gone; what was there before stays."""
    from autocnnp.run import preflight

    checked = preflight.check_data

    def signalled_while_checking(job):
        checked(job)  # the data is checked and cached in the run folder: then the signal comes
        os.kill(os.getpid(), sig)
        time.sleep(10)

    monkeypatch.setattr(preflight, "check_data", signalled_while_checking)
    job = tiny_job(tmp_path)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    rc, _, err = cli("run", job, "--set", f"output={out / 'nested' / 'run'}" if not existing else "output=out")
    assert rc == ExitCode.INTERRUPTED + sig and err == f"autocnnp: interrupted by {sig.name}\n"
    assert (sorted(p.name for p in out.iterdir()) == ["notes.txt"]) if existing else not out.exists()


def test_a_refusal_keeps_an_existing_output_folder(cli, tmp_path, nothing_starts):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    refused(cli, "run", tiny_job(tmp_path, minibatch_size=64))
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_a_file_where_the_run_keeps_a_folder(cli, tmp_path, nothing_starts):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoints").write_text("not a folder")
    err = refused(cli, "run", tiny_job(tmp_path))
    assert f"{tmp_path / 'out' / 'checkpoints'} is a file where the run keeps its checkpoints folder" in err
    assert (tmp_path / "out" / "checkpoints").read_text() == "not a folder"


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"PK\x03\x04 a broken zip"])
def test_a_pretrained_file_that_is_no_checkpoint(cli, tmp_path, nothing_starts, content):
    (tmp_path / "weights.pt").write_bytes(content)
    job = tiny_job(tmp_path)
    job.write_text(job.read_text().replace("<CNN_archi ", "<CNN_archi pretrained=\"weights.pt\" "))
    err = refused(cli, "run", job)
    line = next(i for i, t in enumerate(job.read_text().splitlines(), 1) if "pretrained=" in t)
    assert err.startswith(f"autocnnp: {job}:{line}:") and f"the pretrained checkpoint {tmp_path / 'weights.pt'}" in err


def test_a_pretrained_checkpoint_of_a_tensorflow_run_is_refused_for_a_torch_job_before_the_ranks(cli, tmp_path,
                                                                                                 nothing_starts):
    """Its model card is read without torch in the front-end (the ranks found out after the launch)."""
    torch.save({"model": {"w": torch.zeros(2)}, "model_card": {"framework": "tensorflow"}}, tmp_path / "weights.pt")
    job = tiny_job(tmp_path)
    job.write_text(job.read_text().replace("<CNN_archi ", "<CNN_archi pretrained=\"weights.pt\" "))
    err = refused(cli, "run", job)
    assert f"the pretrained checkpoint {tmp_path / 'weights.pt'} holds a tensorflow model, but the job trains with torch" in err
    assert "Hint: start from a checkpoint of a torch run" in err


def finished_run(folder: Path, job: str = "/jobs/other.xml") -> Path:
    """A run folder as a finished run leaves it: its manifest, checkpoints, metrics."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "metrics.csv").write_text("epoch,loss\n1,0.5\n")
    (folder / "manifest.json").write_text(json.dumps({"autocnnp_manifest": 1, "status": "completed",
                                                      "job": {"file": job}}))
    return folder


def test_an_output_inside_another_runs_folder_is_refused_before_anything_is_written(cli, tmp_path, nothing_starts):
    other = finished_run(tmp_path / "other")
    before = sorted(p.relative_to(other) for p in other.rglob("*"))
    for inside in (other / "checkpoints" / "mine", other / "deeper" / "mine"):
        err = refused(cli, "run", tiny_job(tmp_path), "--set", f"output={inside}")
        assert f"the output folder {inside} is inside {other}, the output folder of the run of /jobs/other.xml" in err
    assert sorted(p.relative_to(other) for p in other.rglob("*")) == before  # no lock, manifest or metrics


def test_an_output_holding_another_runs_folder_is_refused(cli, tmp_path, nothing_starts):
    from autocnnp.run.lock import check_apart, owned

    other = tmp_path / "runs" / "demo"
    with owned(RunDir(other), None):  # a run in its pre-flight checks: a lock, no manifest yet
        err = refused(cli, "run", tiny_job(tmp_path), "--set", f"output={tmp_path / 'runs'}")
        assert f"the output folder {tmp_path / 'runs'} holds {other}, the output folder of the run of pid " \
               f"{os.getpid()}" in err
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["demo"]
    finished_run(other)  # its own repeats and tune runs are no other run's, nor what its layout's folders hold
    for inner in (other / "seed-0", other / "tune" / "runs" / "lr-1", other / "cache" / "pretrained" / "zoo-1"):
        finished_run(inner)
    for folder in (other, other / "seed-0", other / "tune" / "runs" / "lr-1", tmp_path / "elsewhere"):
        check_apart(RunDir(folder), None)


def test_a_lock_whose_holder_still_runs_here_is_not_taken(cli, tmp_path, nothing_starts):
    """Where the filesystem's locks do not hold (the holder's flock is not seen), a holder that still runs
    on this host keeps the folder."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "autocnnp"])
    try:
        (tmp_path / "out").mkdir()
        record = {"pid": holder.pid, "host": socket.gethostname(), "command": "autocnnp run", "started": "now"}
        (tmp_path / "out" / ".lock").write_text(json.dumps(record))
        err = refused(cli, "run", tiny_job(tmp_path))
        assert f"is in use by another run: pid {holder.pid} on host {socket.gethostname()}" in err
    finally:
        holder.kill()
        holder.wait()


def test_a_filesystem_without_locks_is_refused(cli, tmp_path, nothing_starts, monkeypatch):
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)  # what an NFS mount without its lock service answers
    err = refused(cli, "run", tiny_job(tmp_path))
    assert "is on a filesystem that cannot lock files (No locks available)" in err


def test_bad_data_is_found_before_any_rank_starts(cli, tmp_path, nothing_starts):
    from autocnnp.data.synth import write_synthetic_dataset

    ds = write_synthetic_dataset(tmp_path / "ds", "atrium", cases=3, shape=(12, 12, 6), seed=1)
    bad = sorted((ds / "imagesTr").iterdir())[1]
    bad.write_bytes(b"not a nifti file" * 8)
    data = f'<data format="decathlon"><train><path>{ds}</path></train></data>'
    job = write_job(tmp_path / "job.xml", output="out", arch=TINY_UNET, data=data, hyper=dict(minibatch_size=1))
    err = refused(cli, "run", job)
    assert str(bad) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_a_dataset_index_that_is_no_file(cli, tmp_path, kind):
    (tmp_path / "ds").mkdir()
    index = tmp_path / "ds" / "dataset.json"
    if kind == "fifo":
        os.mkfifo(index)  # reading it would wait for a writer forever
    elif kind == "folder":
        index.mkdir()
    else:
        index.symlink_to("/dev/zero")
    data = f'<data format="decathlon"><train><path>{tmp_path / "ds"}</path></train></data>'
    job = write_job(tmp_path / "job.xml", output="out", arch=TINY_UNET, data=data)
    err = refused(cli, "validate", "--data", job)
    assert f"{index}: the dataset index {index} is a" in err and "not a file" in err


def test_an_output_folder_that_cannot_be_written(cli, tmp_path, nothing_starts):
    (tmp_path / "file").write_text("")
    err = refused(cli, "run", tiny_job(tmp_path), "--set", f"output={tmp_path / 'file' / 'out'}")
    assert f"the output folder {tmp_path / 'file' / 'out'} cannot be written" in err


def test_more_ranks_than_cores_needs_oversubscribe(cli, tmp_path, nothing_starts):
    cores = len(os.sched_getaffinity(0))
    job = tiny_job(tmp_path)
    err = refused(cli, "run", job, "--set", f"parallelism-degree={cores + 1}")
    assert f"parallelism-degree {cores + 1} is more ranks than the {cores} slots of this machine's {cores} cores" in err
    threads = refused(cli, "run", job, "--set", f"cluster.cpus_per_task={cores}")
    assert f"than the 1 slots of this machine's {cores} cores at cpus_per_task={cores}" in threads


def test_cpus_per_task_becomes_threads_and_mapping(tmp_path):
    job = load_job(tiny_job(tmp_path, cluster='<property name="cpus_per_task">4</property>'))
    cmd, env = build_command(job, {})
    assert cmd[cmd.index("--map-by"):cmd.index("--map-by") + 4] == ["--map-by", "slot:PE=4", "--bind-to", "core"]
    assert env["OMP_NUM_THREADS"] == "4"
    cmd, env = build_command(load_job(tiny_job(tmp_path)), {})
    assert "--map-by" not in cmd and "OMP_NUM_THREADS" not in env


def test_relative_set_paths_are_read_from_the_job_folder(tmp_path, monkeypatch):
    (tmp_path / "jobs").mkdir()
    job = tiny_job(tmp_path / "jobs")
    monkeypatch.chdir(tmp_path)
    assert load_job(job, ["output=elsewhere"]).generator.rundir.root == tmp_path / "jobs" / "elsewhere"


def test_status_and_cancel_follow_the_variant_that_was_submitted(cli, tmp_path):
    job = tiny_job(tmp_path)
    for command in ("status", "cancel"):
        err = refused(cli, command, job, "--set", "output=variant")
        assert f"no {tmp_path / 'variant' / 'slurm' / 'job.json'}" in err


def test_two_jobs_named_alike_deploy_apart(cli, tmp_path):
    a, b = tiny_job(tmp_path / "a"), tiny_job(tmp_path / "b", end_epoch=7)
    for job in (a, b):
        assert cli("deploy", job, "--to", tmp_path / "shared")[0] == 0
    assert job_tree(tmp_path / "shared", a) != job_tree(tmp_path / "shared", b)
    assert (job_tree(tmp_path / "shared", a) / "job.xml").read_text() == a.read_text()
    assert (job_tree(tmp_path / "shared", b) / "job.xml").read_text() == b.read_text()


def test_swarm_refuses_mpi_and_dry_run_prints_the_service(cli, tmp_path):
    mpi = tiny_job(tmp_path, actions=strategy_module("mpi"), name="mpi.xml")
    err = refused(cli, "deploy", mpi, "--swarm")
    assert "deploy --swarm starts the ranks as replicas without MPI, but communication_init 'mpi4py'" in err
    rc, out, _ = cli("deploy", tiny_job(tmp_path), "--swarm", "--dry-run", "--image", "autocnnp:test")
    assert rc == 0 and out.startswith("dry run: swarm service autocnnp-job-")
    assert "  image: autocnnp:test" in out and "  replicas: 2" in out and f"  stop_grace_period_s: {GRACE_S}" in out
