"""Several hosts: hostfile checks before mpirun starts anything, and a real two-host run on one machine.

The two hosts are network namespaces (cluster/netns/hosts.sh): own addresses, own host names, one
veth link between them, a shared filesystem, and each its own /etc/hosts in the Debian default style
(its own name on 127.0.1.1 first); mpirun reaches the second one through the launch agent
cluster/netns/agent instead of ssh. That part needs root and iproute2, and is skipped without them.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobfiles import TINY_UNET, checkpoint_plugin, require_import, strategy_module, synthetic_data, write_job

import autocnnp.run.launch as launch
from autocnnp.run.hosts import parse_hostfile
from autocnnp.run.job import load_job

ROOT = Path(__file__).resolve().parents[1]
NETNS = ROOT / "cluster" / "netns"
TINY_DATA = synthetic_data(8, 4)
WHERE = """import os, socket
def Where(epoch, metrics, state):
    with open(f"host-rank{os.environ['OMPI_COMM_WORLD_RANK']}.txt", "w") as f:
        f.write(socket.gethostname())
"""


def hosts_job(tmp_path: Path, hosts: str, agent: str | Path = "", oversubscribe: bool = False) -> Path:
    (tmp_path / "hosts").write_text(hosts)
    (tmp_path / "where.py").write_text(WHERE)
    cluster = '<property name="hostfile">hosts</property>'
    cluster += f'<property name="launch_agent">{agent}</property>' if agent else ""
    cluster += f'<property name="oversubscribe">{str(oversubscribe).lower()}</property>'
    ckpt = checkpoint_plugin("Where", "where.py")
    return write_job(tmp_path / "job.xml", output="out", arch=TINY_UNET, data=TINY_DATA,
                     actions=strategy_module(extra=ckpt), hyper=dict(minibatch_size=2, end_epoch=1, lr=0.05),
                     extra=f"<cluster>{cluster}</cluster>")


def fake_agent(tmp_path: Path, body: str) -> Path:
    agent = tmp_path / "agent"
    agent.write_text(f"#!/bin/sh\nhost=$1; shift\n{body}\n")
    agent.chmod(0o755)
    return agent


def test_hostfile_format(tmp_path):
    (tmp_path / "h").write_text("# nodes\nnode1 slots=4 max_slots=8\n\nnode2   # one slot\nnode3 cpu=2\n")
    assert parse_hostfile(tmp_path / "h") == [("node1", 4, 2), ("node2", 1, 4), ("node3", 2, 5)]


def test_launch_agent_reaches_mpirun(tmp_path):
    job = load_job(hosts_job(tmp_path, "localhost slots=2\n", agent="/opt/my-rsh -q"))
    cmd, _ = launch.build_command(job, {})
    assert cmd[cmd.index("plm_rsh_agent") - 1:cmd.index("plm_rsh_agent") + 2] == ["--mca", "plm_rsh_agent",
                                                                                "/opt/my-rsh -q"]


@pytest.mark.parametrize("hosts,agent,problem,hint", [
    ("", "", "lists no hosts", "write one host per line"),
    ("localhost slots=1\n", "", "parallelism-degree 2 is more ranks than the 1 slots of the hostfile", "add slots"),
    ("localhost slots=1\nno-such-host.invalid slots=1\n", "",
     "host 'no-such-host.invalid' (line 2 of", "add it to DNS or /etc/hosts"),
    ("localhost\n192.0.2.7\n", "echo 'ssh: connect to host 192.0.2.7 port 22: No route to host' >&2; exit 255",
     "cannot reach host '192.0.2.7' with `AGENT`: ssh: connect to host 192.0.2.7 port 22: No route to host",
     "passwordless ssh"),
    ("localhost\n192.0.2.7\n", 'case "$*" in true) exit 0;; *) exit 1;; esac',
     "host '192.0.2.7' does not see the job file", "shared filesystem"),
])
def test_bad_hosts_are_refused_before_anything_starts(cli, tmp_path, nothing_starts, hosts, agent, problem, hint):
    agent_path = fake_agent(tmp_path, agent) if agent else ""
    job = hosts_job(tmp_path, hosts, agent=agent_path)
    rc, out, err = cli("run", job)
    line = next(i for i, t in enumerate(job.read_text().splitlines(), 1) if 'name="hostfile"' in t)
    assert rc == 2 and err.startswith(f"autocnnp: {job}:{line}:")
    assert problem.replace("AGENT", str(agent_path)) in err and hint in err and err.count("\n") == 1


@pytest.mark.slow
def test_an_unreachable_host_over_real_ssh(cli, tmp_path, nothing_starts):
    if shutil.which("ssh") is None:
        pytest.skip("no ssh client here")
    job = hosts_job(tmp_path, "localhost\n127.0.0.1\n192.0.2.7\n")  # 192.0.2.0/24: TEST-NET, never routed
    rc, _, err = cli("run", job)
    assert rc == 2 and "cannot reach host '192.0.2.7' with `ssh -o BatchMode=yes" in err


# --------------------------------------------------------------------------- two hosts on one machine


@pytest.fixture(scope="module")
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("two hosts on one machine need root, ip (iproute2) and unshare (network namespaces)")
    up = subprocess.run(["bash", str(NETNS / "hosts.sh"), "up"], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.skip(f"network namespaces are not available here: {up.stderr.strip()}")
    # as on stock Debian and Ubuntu nodes, each host's name resolves first to 127.0.1.1, which only it reaches
    assert on("acp-h1", "getent", "hosts", "acp-h1", cwd=ROOT).stdout.split()[0] == "127.0.1.1"
    yield ["acp-h1", "acp-h2"]
    subprocess.run(["bash", str(NETNS / "hosts.sh"), "down"], capture_output=True)


def on(host: str, *cmd, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "SLURM_"))}
    return subprocess.run([str(NETNS / "on"), host, *map(str, cmd)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


# what a --set value needs installed: (module, make target, flag that makes its absence a failure)
NEEDS = {"tensorflow": ("tensorflow", "tensorflow", "AUTOCNNP_REQUIRE_TENSORFLOW"),
         "horovod": ("horovod.torch", "horovod", "AUTOCNNP_REQUIRE_HOROVOD")}


def run_on_two_hosts(tmp_path: Path, *sets: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``autocnnp run`` from acp-h1 of a job with one rank on each host (``sets``: ``--set`` KEY=VALUE); skipped
    where what they name is not installed."""
    for value in (s.partition("=")[2] for s in sets):
        if value in NEEDS:
            require_import(*NEEDS[value])
    job = hosts_job(tmp_path, "acp-h1 slots=1\nacp-h2 slots=1\n", agent=NETNS / "agent")
    return on("acp-h1", sys.executable, "-m", "autocnnp", "run", job, *(f"--set={s}" for s in sets), cwd=tmp_path,
              timeout=timeout)


@pytest.mark.multihost
@pytest.mark.ranks
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_two_ranks_on_two_hosts(two_hosts, tmp_path, framework):
    result = run_on_two_hosts(tmp_path, f"framework={framework}")
    assert result.returncode == 0, result.stderr[-3000:]
    # each rank ran on its own host: own host name, own network namespace, gloo and MPI over the veth link
    assert [(tmp_path / f"host-rank{r}.txt").read_text() for r in (0, 1)] == ["acp-h1", "acp-h2"]
    with open(tmp_path / "out" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1"] and 0 < float(rows[0]["dice"]) <= 1


CHOOSE = """import json, os, socket
from autocnnp.components.communication.rendezvous import RendezvousConfig, choose, interfaces, resolve
host = socket.gethostname()
def pick(interface=""):
    a = choose(RendezvousConfig(interface=interface), host, interfaces(), [("acp-h2", resolve("acp-h2"))])
    return [a.address, a.interface, a.why]
out = {"auto": pick(), "name": pick("acp-veth1"), "network": pick("10.77.0.0/24"), "lo": pick("lo")}
os.environ["GLOO_SOCKET_IFNAME"] = "acp-veth1"
out["gloo"] = pick()
print(json.dumps(out))
"""


@pytest.mark.multihost
@pytest.mark.parametrize("own_lines,why", [
    ("127.0.1.1 acp-h1\n10.77.0.1 acp-h1\n", "the host name acp-h1 resolves to it"),  # Debian's line, then the real one
    ("127.0.1.1 acp-h1\n", "the host name acp-h1 resolves to 127.0.1.1, and the route to acp-h2 (10.77.0.2) leaves"),
    ("", "the host name acp-h1 resolves to nothing, and the route to acp-h2 (10.77.0.2) leaves"),
], ids=["debian", "only-127.0.1.1", "no-line"])
def test_a_host_offers_the_address_its_peers_reach(two_hosts, tmp_path, own_lines, why):
    hosts = Path("/etc/netns/acp-h1/hosts")
    kept = hosts.read_text()
    try:
        hosts.write_text(f"127.0.0.1 localhost\n{own_lines}10.77.0.2 acp-h2\n")
        result = on("acp-h1", sys.executable, "-c", CHOOSE, cwd=tmp_path, timeout=30)
    finally:
        hosts.write_text(kept)
    assert result.returncode == 0, result.stderr
    chosen = json.loads(result.stdout)
    assert chosen["auto"][:2] == ["10.77.0.1", "acp-veth1"] and chosen["auto"][2].startswith(why)
    assert chosen["name"] == ["10.77.0.1", "acp-veth1", "it is interface acp-veth1's address, set by "
                              "communication_init interface=acp-veth1"]
    assert chosen["network"][:2] == ["10.77.0.1", "acp-veth1"] and "10.77.0.0/24" in chosen["network"][2]
    assert chosen["lo"][:2] == ["127.0.0.1", "lo"]  # what the user asked for: the check before training refuses it
    assert chosen["gloo"][:2] == ["10.77.0.1", "acp-veth1"] and "GLOO_SOCKET_IFNAME=acp-veth1" in chosen["gloo"][2]


@pytest.mark.multihost
@pytest.mark.ranks
@pytest.mark.parametrize("strategy", ["ring_allreduce", "horovod"])
def test_hosts_that_cannot_reach_each_other_end_the_job_at_once(two_hosts, tmp_path, strategy):
    started = time.monotonic()  # interface lo: each host offers 127.0.0.1, where only it reaches itself
    result = run_on_two_hosts(tmp_path, f"dist_strategy={strategy}", "communication_init.interface=lo", timeout=60)
    assert result.returncode == 2 and time.monotonic() - started < 60, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("autocnnp:")]
    assert len(lines) == 1, result.stderr
    assert "cannot open a connection to host acp-h" in lines[0] and "at 127.0.0.1 (Connection refused)" in lines[0]
    assert "set by communication_init interface=lo" in lines[0] and "loopback" in lines[0]
    assert "Hint: set communication_init interface" in lines[0] and "acp-veth" in lines[0]
    assert not (tmp_path / "out" / "metrics.csv").exists()


@pytest.mark.multihost
@pytest.mark.ranks
def test_a_host_that_cannot_be_reached(two_hosts, tmp_path):
    # 10.77.0.3 is on the hosts' network but nobody is there
    job = hosts_job(tmp_path, "acp-h1 slots=1\n10.77.0.3 slots=1\n", agent=NETNS / "agent")
    result = on("acp-h1", sys.executable, "-m", "autocnnp", "run", job, cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "cannot reach host '10.77.0.3'" in result.stderr and "No route to host" in result.stderr
    assert not (tmp_path / "out" / "metrics.csv").exists()
