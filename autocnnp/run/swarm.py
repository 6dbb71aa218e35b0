"""Docker swarm: run a job as a swarm service of N replicas, one rank per replica (docker Python SDK).

``autocnnp deploy JOB.xml --swarm --image IMAGE`` creates, on a swarm manager, a service of
parallelism-degree replicas of IMAGE (built from cluster/docker/Dockerfile) on an overlay network
of its own. Each replica's rank is its task slot minus one (``{{.Task.Slot}}``); rank 0 publishes
its address and a free port in a rendezvous folder inside the job's output folder, the others read
it and all join torch.distributed through MASTER_ADDR/MASTER_PORT (no MPI between replicas). The
job's folder and output folder are bind-mounted at the same paths, so on a swarm of several nodes
they must be on a filesystem every node mounts (or deployed there first: add ``--to DIR``). The
command waits for every task to end, prints the ranks' logs, removes the service and the network
(also when it is stopped by a signal), and exits like ``autocnnp run``: 0 when every rank completed,
a rank's verdict (2 bad input, 3 diverged) as it is, 1 for any other failure (the first rank to fail
is named, not its victims), 128+N when signal N stopped it. Before the service is created a guardian
starts in a session of its own, tied to the command by a pipe: should the command die without
saying it cleaned up (SIGKILL), the guardian removes the service and the network. Only
``communication_init`` torch_distributed can run in a swarm (MPI cannot start inside replicas), and
a swarm neither restarts (``max_restarts``) nor goes on with fewer ranks (``min_ranks``);
``--dry-run`` prints the service.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from ..core.errors import ExitCode, Interrupted, JobError
from ..core.files import atomic_write
from ..core.world import free_port
from . import lock, preflight
from .job import Job
from .supervise import diagnose, read_statuses, verdict

TERMINAL = {"complete", "failed", "shutdown", "rejected", "orphaned", "remove"}
ENDED = b"ended\n"  # the front-end to its guardian: everything of the run is removed
SDK_HINT = "install the docker Python SDK (pip install docker) and a Docker engine (Debian: apt-get install docker.io)"


def _client(job: Job):
    try:
        import docker
    except ImportError:
        raise JobError(job.spec.where, "--swarm needs the docker Python SDK, which is not installed", SDK_HINT) from None
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as exc:  # docker.errors.DockerException and connection errors
        raise JobError(job.spec.where, f"no Docker engine answers: {exc}",
                       "start it (dockerd, or systemctl start docker) and check DOCKER_HOST") from None
    swarm = client.info().get("Swarm", {})
    if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
        raise JobError(job.spec.where, "this Docker engine is not a swarm manager "
                       f"(swarm state: {swarm.get('LocalNodeState') or 'unknown'})",
                       "run `docker swarm init` here, or run the command on a manager node")
    return client


def _mounts(job: Job) -> list[str]:
    """The folders to bind-mount at their own paths: the job's folder and output folder."""
    folders: list[Path] = []
    for folder in (job.spec.base_dir, job.rundir.root):
        folder = folder.resolve()
        if not any(folder == f or f in folder.parents for f in folders):
            folders = [f for f in folders if folder not in f.parents] + [folder]
    return [str(f) for f in folders]


def check_swarm(job: Job) -> None:
    """Swarm replicas join through torch.distributed's MASTER_ADDR, never MPI: refuse any other
    communication_init before Docker is asked for anything."""
    comm = job.generator.action("communication_init")
    if comm.entry.name != "torch_distributed":
        strategy = job.generator.action("dist_strategy").entry.name
        raise JobError(comm.where or job.spec.where, f"deploy --swarm starts the ranks as replicas without MPI, but "
                       f"communication_init '{comm.entry.name}' (dist_strategy '{strategy}') joins them through MPI",
                       "run this job with `autocnnp run` or `autocnnp submit`, or use communication_init "
                       "torch_distributed (dist_strategy ring_allreduce or fedavg) for a swarm")
    launch = job.launch
    if launch.max_restarts:
        raise JobError(job.where("max_restarts"), f"deploy --swarm does not restart a failed job, but max_restarts "
                       f"is {launch.max_restarts}", "run the job with `autocnnp run` to have it restarted, or remove "
                       "max_restarts (or set it to 0) for a swarm")
    if launch.min_ranks is not None:
        raise JobError(job.where("min_ranks"), f"deploy --swarm starts all {job.world_size} ranks or none, "
                       f"but min_ranks is {launch.min_ranks}", "run the job with `autocnnp run` and a hostfile to go "
                       "on with the hosts that answer, or remove min_ranks for a swarm")


def service_spec(job: Job, image: str, run_id: str) -> dict:
    """The swarm service of the job (``docker service create`` arguments, Docker SDK spelling)."""
    gen = job.generator
    rendezvous = gen.rundir.swarm.resolve() / run_id
    return dict(
        image=image, command=["python3", "-m", "autocnnp.run.swarm", str(gen.spec.file)],
        name=f"autocnnp-{gen.spec.file.stem.lower()}-{run_id}"[:63],
        env=["AUTOCNNP_SLOT={{.Task.Slot}}", f"WORLD_SIZE={gen.world_size}", f"AUTOCNNP_RENDEZVOUS={rendezvous}",
             f"AUTOCNNP_STARTUP_TIMEOUT_S={job.launch.startup_timeout_s:g}", "OMP_NUM_THREADS=1"],
        hostname="{{.Service.Name}}-{{.Task.Slot}}", workdir=str(gen.spec.base_dir), replicas=gen.world_size,
        mounts=_mounts(job), stop_grace_period_s=job.launch.stop_grace_s,
        labels={"autocnnp.job": str(gen.spec.file), "autocnnp.run": run_id})


def print_spec(spec: dict, out) -> None:
    """``deploy --swarm --dry-run``: what would be created, one setting per line."""
    print(f"dry run: swarm service {spec['name']} (nothing is created)", file=out)
    for key, value in spec.items():
        if key != "name":
            text = ", ".join(map(str, value)) if isinstance(value, list) else value
            print(f"  {key}: {text}", file=out)


def run_swarm(job: Job, image: str, timeout_s: float = 3600.0, dry_run: bool = False, out=None) -> int:
    """Run the job as a swarm service and wait for it; returns the job's exit code. The service and its
    network are removed however the command ends: a signal included, by its guardian after a SIGKILL."""
    out = out or sys.stdout
    check_swarm(job)
    spec = service_spec(job, image, uuid.uuid4().hex[:8])
    if dry_run:
        print_spec(spec, out)
        return 0
    gen = job.generator
    rundir = gen.rundir
    with lock.own_output(job, front_end=True) as claim:  # what `autocnnp run` checks but the framework (the image's)
        preflight.check_output(job)
        preflight.check_inputs(job)
        client = _client(job)
        import docker
        from docker.types import EndpointSpec, Mount, RestartPolicy, ServiceMode

        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            raise JobError(job.spec.where, f"image '{image}' is not on this Docker engine",
                           f"build it: docker build -f cluster/docker/Dockerfile -t {image} . (where no base image "
                           "can be pulled, first cluster/docker/base-from-host.sh; see the Dockerfile)") from None
        claim.keep()
        run_id = spec["labels"]["autocnnp.run"]
        rendezvous = rundir.swarm.resolve() / run_id
        rendezvous.mkdir(parents=True, exist_ok=True)
        for stale in rundir.ranks.glob("rank*"):
            stale.unlink(missing_ok=True)
        guardian = subprocess.Popen([sys.executable, "-m", "autocnnp.run.swarm", "--guard", run_id],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            network = client.networks.create(spec["name"], driver="overlay", attachable=True, labels=spec["labels"])
            service = client.services.create(
                image, command=spec["command"], name=spec["name"], env=spec["env"], hostname=spec["hostname"],
                workdir=spec["workdir"], mode=ServiceMode("replicated", replicas=spec["replicas"]),
                restart_policy=RestartPolicy(condition="none"), networks=[network.id],
                mounts=[Mount(target=m, source=m, type="bind") for m in spec["mounts"]],
                endpoint_spec=EndpointSpec(mode="dnsrr"), labels=spec["labels"], container_labels=spec["labels"],
                stop_grace_period=int(spec["stop_grace_period_s"] * 10**9))  # then SIGKILL
            print(f"swarm service {spec['name']}: {gen.world_size} replicas of {image}, ranks from the task slot",
                  file=out, flush=True)
            code, problem = _wait(service, job, timeout_s)
            logs = b"".join(service.logs(stdout=True, stderr=True, timestamps=False)).decode(errors="replace")
            out.write(logs if logs.endswith("\n") or not logs else logs + "\n")
            passed = verdict(code, rundir)
            if passed is not None:
                return passed
            print(f"autocnnp: the job failed: {problem}", file=sys.stderr, flush=True)
            return ExitCode.FAILED
        except Interrupted as exc:
            exc.detail = (f"removed swarm service {spec['name']} and its {gen.world_size} replicas; the same command "
                          "resumes from the latest checkpoint")
            raise
        finally:
            left = _remove_run(client, run_id)
            if left:
                print(f"autocnnp: {', '.join(left)} of swarm run {run_id} could not be removed; {_by_hand(run_id)}",
                      file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):  # a broken pipe: the guardian is gone already
                guardian.stdin.write(ENDED)
                guardian.stdin.close()
            guardian.wait()
            for f in rendezvous.glob("*"):
                f.unlink(missing_ok=True)
            rendezvous.rmdir()


def _remove_run(client, run_id: str, timeout_s: float = 90.0) -> list[str]:
    """Remove everything labelled with the run: its service, then, once its containers are gone, its network.
    Returns the names of what is still there after ``timeout_s``."""
    import docker

    labelled = {"label": f"autocnnp.run={run_id}"}
    deadline = time.monotonic() + timeout_s
    while True:
        services = client.services.list(filters=labelled)
        containers = client.containers.list(all=True, filters=labelled)
        networks = client.networks.list(filters=labelled)
        if not (services or containers or networks):
            return []
        if time.monotonic() > deadline:
            return [item.name for item in services + containers + networks]
        for item in services + ([] if containers else networks):  # a network is in use until its containers go
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                item.remove()
        time.sleep(0.5)


def _by_hand(run_id: str) -> str:
    label = f"label=autocnnp.run={run_id}"
    return (f"remove them with: docker service rm $(docker service ls -q -f {label}); "
            f"docker network rm $(docker network ls -q -f {label})")


def guard(run_id: str) -> int:
    """The guardian of a swarm run (``python -m autocnnp.run.swarm --guard RUN_ID``, a session of its own): when
    the front-end's pipe on stdin closes without ENDED (the front-end died, by SIGKILL too), remove everything
    labelled with the run."""
    if sys.stdin.buffer.read() == ENDED:
        return 0
    import docker

    time.sleep(2.0)  # a request the front-end had under way when it died (creating the service) lands first
    try:
        left = _remove_run(docker.from_env(timeout=60), run_id)
    except docker.errors.DockerException as exc:
        left = [f"the service and network (Docker: {exc})"]
    if left:
        print(f"autocnnp: the front-end of swarm run {run_id} died; its guardian could not remove {', '.join(left)}; "
              f"{_by_hand(run_id)}", file=sys.stderr, flush=True)
        return 1
    print(f"autocnnp: the front-end of swarm run {run_id} died; its guardian removed the run's service, replicas "
          "and network", file=sys.stderr, flush=True)
    return 0


def _wait(service, job: Job, timeout_s: float) -> tuple[int, str | None]:
    """Poll the service's tasks until every one completed or one ended otherwise: (0, None), or the exit code of
    the first task to fail (1 without one) and what ended the job."""
    gen = job.generator
    deadline = time.monotonic() + timeout_s
    while True:
        by_slot = {t.get("Slot"): t for t in sorted(service.tasks(), key=lambda t: t.get("CreatedAt", ""))}
        ended = {slot: t for slot, t in by_slot.items() if t["Status"]["State"] in TERMINAL}
        failed = [t for t in ended.values() if t["Status"]["State"] != "complete"]
        if failed:
            first = min(failed, key=_moment)
            code = first["Status"].get("ContainerStatus", {}).get("ExitCode")
            return (code if isinstance(code, int) and code > 0 else ExitCode.FAILED), _blame(first, ended, job)
        if len(ended) == gen.world_size:
            return 0, None
        running = {r: info["age"] for r, info in read_statuses(gen.rundir).items() if info["state"] == "running"}
        if running and max(running.values()) > job.launch.rank_timeout_s:
            rank = max(running, key=running.get)
            return ExitCode.FAILED, f"rank {rank} stopped responding (rank_timeout_s={job.launch.rank_timeout_s:g})"
        if time.monotonic() > deadline:
            states = {slot: t["Status"]["State"] for slot, t in by_slot.items()}
            return ExitCode.FAILED, f"the service did not finish within {timeout_s:g} s (task states: {states})"
        time.sleep(1.0)


def _moment(task: dict) -> tuple[str, float]:
    """When the task reached its state, comparable (Docker's RFC 3339 UTC time trims the nanoseconds' zeros)."""
    whole, _, fraction = task["Status"]["Timestamp"].rstrip("Z").partition(".")
    return whole, float(f"0.{fraction or 0}")


def _blame(first: dict, ended: dict[int, dict], job: Job) -> str:
    """What ended the job, ``first`` being the first task to fail: named as ``autocnnp run`` names it, from the
    rank statuses that are final (a rank still running is a victim at most, unless its task ended: killed);
    where the rank never reported, the task's own error."""
    slot, status = first["Slot"], first["Status"]
    code = status.get("ContainerStatus", {}).get("ExitCode")
    statuses = {r: info for r, info in read_statuses(job.rundir).items()
                if r + 1 in ended or info["state"] not in ("started", "running")}
    if slot - 1 in statuses:
        return diagnose(statuses, job.world_size, f"the replica of rank {slot - 1} (task slot {slot})", code)
    why = status.get("Err") or status.get("Message") or status["State"]
    return f"rank {slot - 1} (task slot {slot}) {status['State']}: {why}" + (f" (exit code {code})" if code else "")


def task_main(job: str) -> int:
    """Inside one replica: rank from the task slot, rendezvous through the shared folder, then train."""
    slot, size = int(os.environ["AUTOCNNP_SLOT"]), int(os.environ["WORLD_SIZE"])
    rank = slot - 1
    os.environ.update(RANK=str(rank), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    master = Path(os.environ["AUTOCNNP_RENDEZVOUS"]) / "master"
    if rank == 0:
        atomic_write(master, f"{socket.gethostbyname(socket.gethostname())} {free_port()}")
    deadline = time.monotonic() + float(os.environ.get("AUTOCNNP_STARTUP_TIMEOUT_S", "120"))
    while not master.exists():
        if time.monotonic() > deadline:
            print(f"autocnnp: rank {rank}: rank 0 never published its address in {master}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    addr, port = master.read_text().split()
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=port)
    print(f"autocnnp: rank {rank} of {size} on {socket.gethostname()}, rank 0 at {addr}:{port}", flush=True)
    from .worker import main

    return main([job])


if __name__ == "__main__":
    sys.exit(guard(sys.argv[2]) if sys.argv[1] == "--guard" else task_main(sys.argv[1]))
