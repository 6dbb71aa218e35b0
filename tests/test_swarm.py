"""`autocnnp deploy --swarm`: a job as a Docker swarm service, one rank per replica (rank = task slot - 1).

Needs a Docker engine and a base image for cluster/docker/Dockerfile that is already on it (no image
can be pulled here): AUTOCNNP_DOCKER_BASE, default autocnnp-base:local, made by
cluster/docker/base-from-host.sh; cluster/docker/start.sh starts an engine and builds that image. Without
them these tests are skipped, saying which is missing; AUTOCNNP_REQUIRE_DOCKER=1 (CI) fails them instead. The
test builds the runtime image from the Dockerfile and, if this engine is no swarm manager yet, runs
`docker swarm init` (and leaves the swarm again afterwards, removing the bridge it made).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobfiles import TINY_UNET, checkpoint_plugin, skip_or_fail, strategy_module, synthetic_data, write_job

ROOT = Path(__file__).resolve().parents[1]
BASE = os.environ.get("AUTOCNNP_DOCKER_BASE", "autocnnp-base:local")
IMAGE = "autocnnp:test"
TINY_DATA = synthetic_data(8, 4)
PLUGIN = """import os, socket, time
from autocnnp.training.monitor import Diverged
def Where(epoch, metrics, state):
    rank = os.environ["RANK"]
    with open(f"host-rank{rank}.txt", "w") as f:
        f.write(socket.gethostname())
    if os.path.exists(f"fail-rank{rank}"):
        raise RuntimeError("injected failure")
    if os.path.exists(f"diverge-rank{rank}"):
        raise Diverged("injected divergence", epoch, 0, float("nan"))
    if os.path.exists(f"victim-rank{rank}"):  # a victim: fails as a lost peer, after rank 1 failed
        deadline = time.time() + 60
        while '"failed"' not in open("out/.ranks/rank1").read() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        raise ConnectionResetError("Connection reset by peer")
"""


def swarm_job(tmp_path: Path) -> Path:
    (tmp_path / "where.py").write_text(PLUGIN)
    ckpt = checkpoint_plugin("Where", "where.py")
    return write_job(tmp_path / "job.xml", output="out", arch=TINY_UNET, data=TINY_DATA,
                     actions=strategy_module(extra=ckpt), hyper=dict(minibatch_size=2, end_epoch=1, lr=0.05))


def test_swarm_without_the_sdk_is_a_clear_error(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "docker", None)  # import docker -> ImportError
    rc, _, err = cli("deploy", swarm_job(tmp_path), "--swarm")
    assert rc == 2 and "--swarm needs the docker Python SDK" in err and "pip install docker" in err


@pytest.mark.parametrize(("setting", "problem", "hint"), [
    ('<property name="max_restarts">2</property>', "deploy --swarm does not restart a failed job, but max_restarts "
     "is 2", "run the job with `autocnnp run` to have it restarted, or remove max_restarts (or set it to 0)"),
    ('<property name="min_ranks">1</property>', "deploy --swarm starts all 2 ranks or none, but min_ranks is 1",
     "run the job with `autocnnp run` and a hostfile to go on with the hosts that answer, or remove min_ranks"),
])
def test_swarm_refuses_what_it_cannot_do_naming_the_line(cli, tmp_path, setting, problem, hint):
    job = write_job(tmp_path / "job.xml", extra=f"\n<cluster>\n{setting}\n</cluster>")
    line = job.read_text().splitlines().index(setting) + 1
    rc, out, err = cli("deploy", job, "--swarm", "--dry-run")  # refused before Docker is asked for anything
    assert rc == 2 and out == ""
    assert err.startswith(f"autocnnp: {job}:{line}:") and problem in err and hint in err and "Traceback" not in err


class Service:
    """A swarm service's task list as Docker reports it (``docker service ps``), frozen."""

    def __init__(self, *tasks: dict):
        self._tasks = list(tasks)

    def tasks(self) -> list[dict]:
        return self._tasks


def task(slot: int, state: str, timestamp: str, code: int) -> dict:
    return {"Slot": slot, "CreatedAt": "2026-01-01T10:00:00Z", "Status": {
        "State": state, "Timestamp": timestamp, "Err": f"task: non-zero exit ({code})", "ContainerStatus": {"ExitCode": code}}}


def test_the_first_task_to_fail_is_blamed_not_the_smallest_slot(tmp_path):
    from autocnnp.run.job import load_job
    from autocnnp.run.supervise import RankStatus
    from autocnnp.run.swarm import _wait

    job = load_job(write_job(tmp_path / "job.xml"))
    # Docker trims the nanoseconds' trailing zeros: .12 (slot 2) is before .123456789 (slot 1)
    service = Service(task(1, "failed", "2026-01-01T10:00:00.123456789Z", 1), task(2, "failed", "2026-01-01T10:00:00.12Z", 3))
    assert _wait(service, job, 10) == (3, "rank 1 (task slot 2) failed: task: non-zero exit (3) (exit code 3)")
    rundir = job.rundir
    rundir.ranks.mkdir(parents=True)
    RankStatus(rundir, 0).set("failed", "RuntimeError: Connection reset by peer")  # the victim
    RankStatus(rundir, 1).set("failed", "ValueError: bad")
    service = Service(task(1, "failed", "2026-01-01T10:00:00.1Z", 1), task(2, "running", "2026-01-01T10:00:00Z", 0))
    assert _wait(service, job, 10) == (1, "rank 1 failed: ValueError: bad")  # its own status is final: it failed


def _engine():
    """A client of this machine's Docker engine with the base image on it, and None; or None and why not."""
    try:
        import docker
    except ImportError:
        return None, "the docker Python SDK is not installed (make venv)"
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:
        return None, f"no Docker engine answers here ({exc}); cluster/docker/start.sh starts one"
    try:
        client.images.get(BASE)
    except docker.errors.ImageNotFound:
        return None, (f"base image {BASE} is not on this engine and none can be pulled: cluster/docker/start.sh "
                      "builds it (cluster/docker/base-from-host.sh), or set AUTOCNNP_DOCKER_BASE")
    return client, None


@pytest.fixture(scope="module")
def swarm():
    client, why = _engine()
    if why:
        skip_or_fail(why, "AUTOCNNP_REQUIRE_DOCKER")
    client.images.build(path=str(ROOT), dockerfile="cluster/docker/Dockerfile", buildargs={"BASE": BASE}, tag=IMAGE,
                        rm=True)
    joined = client.info()["Swarm"]["LocalNodeState"] == "active"
    bridged = bool(client.networks.list(names=["docker_gwbridge"]))
    if not joined:
        client.swarm.init(advertise_addr="127.0.0.1")
    yield client
    if not joined:
        client.swarm.leave(force=True)
        if not bridged:  # the gateway bridge `docker swarm init` made
            for network in client.networks.list(names=["docker_gwbridge"]):
                network.remove()


def leftovers(client) -> list[str]:
    """Every service, container and network of a swarm run still there."""
    labelled = {"label": "autocnnp.run"}
    return [s.name for s in client.services.list(filters=labelled)] + \
        [c.name for c in client.containers.list(all=True, filters=labelled)] + \
        [n.name for n in client.networks.list(filters=labelled)]


def guardians() -> list[int]:
    """The pids of the swarm guardians running on this machine."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"autocnnp.run.swarm\0--guard\0" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.docker
def test_two_replicas_train_one_rank_each(swarm, cli, tmp_path):
    job = swarm_job(tmp_path)
    rc, out, err = cli("deploy", job, "--swarm", "--image", IMAGE, "--timeout", 300)
    assert rc == 0, out + err
    hosts = [(tmp_path / f"host-rank{r}.txt").read_text() for r in (0, 1)]
    assert hosts[0].endswith("-1") and hosts[1].endswith("-2")  # rank = task slot - 1, one container each
    assert "autocnnp: rank 0 of 2 on " in out and "autocnnp: rank 1 of 2 on " in out
    with open(tmp_path / "out" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1"] and 0 < float(rows[0]["dice"]) <= 1
    assert leftovers(swarm) == [] and guardians() == []


@pytest.mark.docker
def test_the_first_replica_to_fail_is_named_not_its_victim(swarm, cli, tmp_path):
    job = swarm_job(tmp_path)
    (tmp_path / "fail-rank1").write_text("")
    (tmp_path / "victim-rank0").write_text("")  # rank 0 (task slot 1, the smaller) fails after rank 1
    rc, out, err = cli("deploy", job, "--swarm", "--image", IMAGE, "--timeout", 300)
    assert rc == 1
    assert err.splitlines()[-1] == "autocnnp: the job failed: rank 1 failed: RuntimeError: injected failure"
    assert "injected failure" in out
    assert leftovers(swarm) == [] and guardians() == []


@pytest.mark.docker
def test_a_diverged_replica_is_exit_3(swarm, cli, tmp_path):
    job = swarm_job(tmp_path)
    (tmp_path / "diverge-rank1").write_text("")
    rc, out, err = cli("deploy", job, "--swarm", "--image", IMAGE, "--timeout", 300)
    assert rc == 3, out + err
    assert "autocnnp: rank 1: training diverged: injected divergence" in out and "the job failed" not in err
    assert leftovers(swarm) == []




@pytest.mark.docker
def test_an_image_that_is_not_there(swarm, cli, tmp_path):
    rc, _, err = cli("deploy", swarm_job(tmp_path), "--swarm", "--image", "autocnnp:no-such-tag")
    assert rc == 2 and "image 'autocnnp:no-such-tag' is not on this Docker engine" in err
    assert "docker build -f cluster/docker/Dockerfile" in err
    assert leftovers(swarm) == []


@pytest.mark.docker
def test_a_stale_lock_is_taken_over_with_a_note(swarm, cli, tmp_path):
    (tmp_path / "out").mkdir()  # the lock file of a run that died (the kernel released its lock)
    (tmp_path / "out" / ".lock").write_text('{"pid": 99999999, "host": "gone", "started": "then", "command": "x"}')
    rc, _, err = cli("deploy", swarm_job(tmp_path), "--swarm", "--image", "autocnnp:no-such-tag")
    assert rc == 2 and "autocnnp: note: took over the lock of pid 99999999 on host gone since then (x)" in err


def long_swarm_run(tmp_path: Path, until) -> subprocess.Popen:
    """``deploy --swarm`` of a long job, in a session of its own, once ``until(output folder)`` holds."""
    job = write_job(tmp_path / "job.xml", output="out", arch=TINY_UNET, data=TINY_DATA,
                    hyper=dict(minibatch_size=2, end_epoch=500, lr=0.05))
    proc = subprocess.Popen([sys.executable, "-m", "autocnnp", "deploy", str(job), "--swarm", "--image", IMAGE],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while not until(tmp_path / "out"):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the swarm run did not get going: {proc.stderr.read() if proc.poll() else ''}")
        time.sleep(0.5)
    return proc


@pytest.mark.docker
def test_sigterm_removes_the_service_and_its_network(swarm, tmp_path):
    proc = long_swarm_run(tmp_path, lambda out: (out / "metrics.csv").exists())
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 143
        last = proc.stderr.read().strip().splitlines()[-1]
        assert last.startswith("autocnnp: interrupted by SIGTERM: removed swarm service autocnnp-job-") and \
            "Traceback" not in last
        assert leftovers(swarm) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.docker
def test_sigkill_of_the_front_end_leaves_nothing_behind(swarm, tmp_path):
    proc = long_swarm_run(tmp_path, lambda out: len(list((out / ".ranks").glob("rank*"))) == 2)  # both replicas up
    try:
        assert len(guardians()) == 1 and leftovers(swarm)
        os.killpg(proc.pid, signal.SIGKILL)  # the front-end and its process group; the guardian has its own
        proc.wait(10)
        deadline = time.monotonic() + 60
        while (leftovers(swarm) or guardians()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert leftovers(swarm) == [] and guardians() == []
        assert proc.stderr.read().strip().splitlines()[-1].endswith(
            "died; its guardian removed the run's service, replicas and network")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
