"""`autocnnp deploy --swarm`: a job as a Docker swarm service, one rank per replica (rank = task slot - 1).

Needs a Docker engine and a base image for cluster/docker/Dockerfile that is already on it (no image
can be pulled here): AUTOCNNP_DOCKER_BASE, default autocnnp-base:local, made by
cluster/docker/base-from-host.sh. Without them these tests are skipped, saying which is missing. The
test builds the runtime image from the Dockerfile and, if this engine is no swarm manager yet, runs
`docker swarm init` (and leaves the swarm again afterwards).
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
from jobfiles import TINY_UNET, checkpoint_plugin, strategy_module, synthetic_data, write_job

ROOT = Path(__file__).resolve().parents[1]
BASE = os.environ.get("AUTOCNNP_DOCKER_BASE", "autocnnp-base:local")
IMAGE = "autocnnp:test"
TINY_DATA = synthetic_data(8, 4)
PLUGIN = """import os, socket
def Where(epoch, metrics, state):
    rank = os.environ["RANK"]
    with open(f"host-rank{rank}.txt", "w") as f:
        f.write(socket.gethostname())
    if rank == "1" and os.path.exists("fail-rank1"):
        raise RuntimeError("injected failure")
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


@pytest.fixture(scope="module")
def swarm():
    docker = pytest.importorskip("docker", reason="the docker Python SDK is not installed")
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:
        pytest.skip(f"no Docker engine answers here ({exc}); Debian: apt-get install docker.io, then start dockerd")
    try:
        client.images.get(BASE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"base image {BASE} is not on this engine and none can be pulled: build it with "
                    "cluster/docker/base-from-host.sh (or set AUTOCNNP_DOCKER_BASE)")
    client.images.build(path=str(ROOT), dockerfile="cluster/docker/Dockerfile", buildargs={"BASE": BASE}, tag=IMAGE,
                        rm=True)
    joined = client.info()["Swarm"]["LocalNodeState"] == "active"
    if not joined:
        client.swarm.init(advertise_addr="127.0.0.1")
    yield client
    if not joined:
        client.swarm.leave(force=True)


def leftovers(client) -> list[str]:
    return [s.name for s in client.services.list(filters={"label": "autocnnp.run"})] + \
        [n.name for n in client.networks.list(filters={"label": "autocnnp.run"})]


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
    assert leftovers(swarm) == []


@pytest.mark.docker
def test_a_failing_replica_fails_the_job_naming_its_rank(swarm, cli, tmp_path):
    job = swarm_job(tmp_path)
    (tmp_path / "fail-rank1").write_text("")
    rc, out, err = cli("deploy", job, "--swarm", "--image", IMAGE, "--timeout", 300)
    assert rc == 1
    assert "autocnnp: the job failed: rank 1 (task slot 2) failed" in err
    assert "injected failure" in out
    assert leftovers(swarm) == []


@pytest.mark.docker
def test_an_image_that_is_not_there(swarm, cli, tmp_path):
    rc, _, err = cli("deploy", swarm_job(tmp_path), "--swarm", "--image", "autocnnp:no-such-tag")
    assert rc == 2 and "image 'autocnnp:no-such-tag' is not on this Docker engine" in err
    assert "docker build -f cluster/docker/Dockerfile" in err
    assert leftovers(swarm) == []


@pytest.mark.docker
def test_sigterm_removes_the_service_and_its_network(swarm, tmp_path):
    job = write_job(tmp_path / "job.xml", output="out", arch=TINY_UNET, data=TINY_DATA,
                    hyper=dict(minibatch_size=2, end_epoch=500, lr=0.05))
    proc = subprocess.Popen([sys.executable, "-m", "autocnnp", "deploy", str(job), "--swarm", "--image", IMAGE],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "out" / "metrics.csv").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 143
        last = proc.stderr.read().strip().splitlines()[-1]
        assert last.startswith("autocnnp: interrupted by SIGTERM: removed swarm service autocnnp-job-") and \
            "Traceback" not in last
        assert leftovers(swarm) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
