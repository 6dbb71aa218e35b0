"""Slurm: `autocnnp submit/status/cancel`, the sbatch script, srun launching, rank discovery.

The first tests need no Slurm. The rest submit real jobs to a running Slurm (the single-node
cluster of cluster/slurm/start.sh, which CI starts); without one they are skipped, unless
AUTOCNNP_REQUIRE_SLURM=1 (CI) turns the skip into a failure.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobfiles import TINY_UNET, require_import, synthetic_data, write_job

from autocnnp.core.rundir import RunDir
from autocnnp.core.world import discover_world, launcher_name
from autocnnp.run.job import load_job
from autocnnp.run.launch import build_command, launch_mode
from autocnnp.run.lock import is_held, owned
from autocnnp.run.slurm import limit_seconds

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = synthetic_data(8, 4)
TINY = dict(minibatch_size=2, end_epoch=1, lr=0.05, optimiser="sgd")


def tiny_job(tmp_path: Path, name: str = "job.xml", cluster: str = "", epochs: int = 1, degree: int = 2) -> Path:
    extra = f"<cluster>{cluster}</cluster>" if cluster else ""
    return write_job(tmp_path / name, degree=degree, output=f"out-{Path(name).stem}", arch=TINY_UNET, data=TINY_DATA,
                     hyper={**TINY, "end_epoch": epochs}, extra=extra)


def prop(name: str, value) -> str:
    return f'<property name="{name}">{value}</property>'


def directives(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, re.M))


# --------------------------------------------------------------------------- without Slurm


def test_dry_run_renders_the_cluster_section_and_command_line(cli, tmp_path):
    job = tiny_job(tmp_path, cluster=prop("partition", "debug") + prop("time_limit", "00:10:00")
                   + prop("cpus_per_task", 1) + prop("account", "lab") + prop("sbatch_args", "--exclusive"))
    rc, out, err = cli("submit", job, "--dry-run", "--time", "5", "--gpus-per-task", "1", "--launcher", "srun")
    assert (rc, err) == (0, "")
    d = directives(out)
    assert d == {"job-name": "autocnnp-job", "nodes": "1", "ntasks": "2", "ntasks-per-node": "2",
                 "cpus-per-task": "1", "time": "5", "output": str(tmp_path / "out-job" / "slurm-%j.out"),
                 "chdir": str(tmp_path), "gpus-per-task": "1", "partition": "debug", "account": "lab",
                 "signal": "B:USR1@150"}  # the 300 s warning, at most half of a 5-minute limit: not at the start
    assert "#SBATCH --exclusive" in out and "#SBATCH --requeue" not in out
    assert f"{sys.executable} -m autocnnp run --launcher srun {job}" in out
    assert not (tmp_path / "out-job").exists()  # a dry run writes nothing


def test_a_job_variant_reaches_the_batch_script(cli, tmp_path):
    job = tiny_job(tmp_path)
    rc, out, _ = cli("submit", job, "--dry-run", "--set", "hyperparameters.lr=0.5", "--set", "cluster.nodes=2")
    assert rc == 0 and directives(out)["nodes"] == "2"
    assert f"-m autocnnp run --launcher mpirun --set=hyperparameters.lr=0.5 --set=cluster.nodes=2 {job}" in out
    rc, _, err = cli("submit", job, "--dry-run", "--set", "hyperparameters.lr=fast")
    assert rc == 2 and "lr" in err and "Hint:" in err


def test_memory_exclusive_setup_and_requeue_reach_the_batch_script(cli, tmp_path):
    job = tiny_job(tmp_path, cluster=prop("setup", "module load openmpi/4.1; source ~/env.sh\n  export A=1  # note")
                   + prop("requeue", "true") + prop("signal_before_s", 600))
    rc, out, err = cli("submit", job, "--dry-run", "--mem", "32G", "--exclusive")
    assert (rc, err) == (0, "")
    assert directives(out)["mem"] == "32G" and directives(out)["signal"] == "B:USR1@600"
    assert "#SBATCH --exclusive" in out and "#SBATCH --requeue" in out
    body = out.splitlines()
    setup = body.index("{ module load openmpi/4.1; source ~/env.sh")  # one line, one command: ';' stays in it
    assert body[setup + 1:setup + 4] == ["} || setup_failed 1 $? 'module load openmpi/4.1; source ~/env.sh'",
                                         "{ export A=1  # note", "} || setup_failed 2 $? 'export A=1  # note'"]
    assert setup < next(i for i, t in enumerate(body) if "-m autocnnp run" in t)
    rc, out, _ = cli("submit", job, "--dry-run", "--set", "cluster.signal_before_s=0")
    assert rc == 0 and "signal" not in directives(out)


def test_a_setup_line_that_is_no_whole_command_is_refused(cli, tmp_path):
    job = tiny_job(tmp_path, cluster=prop("setup", "module load openmpi\nif true; then"))
    rc, out, err = cli("submit", job, "--dry-run")
    line = next(i for i, t in enumerate(job.read_text().splitlines(), 1) if 'name="setup"' in t)
    assert (rc, out) == (2, "") and err.count("\n") == 1
    assert err.startswith(f"autocnnp: {job}:{line}:") and "setup line 2 `if true; then` is not a complete shell" in err


def test_time_limits_in_seconds():
    assert [limit_seconds(t) for t in ("5", "5:30", "01:00:00", "2-3", "1-00:10", "1-0:0:7", "UNLIMITED")] == \
        [300, 330, 3600, 2 * 86400 + 3 * 3600, 86400 + 600, 86407, None]


def test_tasks_spread_over_nodes(cli, tmp_path):
    job = tiny_job(tmp_path, degree=5, cluster=prop("nodes", 2))
    rc, out, _ = cli("submit", job, "--dry-run")
    assert rc == 0 and (directives(out)["ntasks"], directives(out)["ntasks-per-node"]) == ("5", "3")


@pytest.mark.parametrize("cluster,options,needle,problem", [
    (prop("nodes", 3), (), 'name="nodes"', "asks for 3 nodes but has only 2 ranks"),
    ("", ("--nodes", "2", "--tasks-per-node", "1", "--time", "x"), "--time", "'x' is not a Slurm time limit"),
    (prop("tasks_per_node", 1), (), 'name="tasks_per_node"', "1 node(s) x 1 tasks per node hold 1 ranks"),
    ("", ("--nodes", "0"), "--nodes", "nodes is 0, it must be at least 1"),
    ("", ("--partition", "a b"), "--partition", "partition 'a b' has characters Slurm names never have"),
    ("", ("--launcher", "srn"), "--launcher", "'srn' is not a valid launcher. Hint: did you mean 'srun'?"),
    ("", ("--time", "0"), "--time", "time limit '0' is zero, which Slurm takes as no limit"),
    (prop("time_limit", "00:00:00"), (), 'name="time_limit"', "is zero, which Slurm takes as no limit"),
    ("", ("--mem", "lots"), "--mem", "mem 'lots' is not a Slurm memory size"),
])
def test_impossible_resources_are_refused_before_slurm_is_asked(cli, tmp_path, monkeypatch, cluster, options,
                                                                 needle, problem):
    def no_slurm(*args, **kwargs):
        raise AssertionError("nothing may be submitted")

    monkeypatch.setattr(subprocess, "run", no_slurm)
    job = tiny_job(tmp_path, cluster=cluster)
    rc, out, err = cli("submit", job, *options)
    assert rc == 2 and out == ""
    assert problem in err and err.count("\n") == 1 and "Hint:" in err
    if needle.startswith("--"):
        assert err.startswith(f"autocnnp: {job} (command line {needle}): ")
    else:
        line = next(i for i, text in enumerate(job.read_text().splitlines(), 1) if needle in text)
        assert err.startswith(f"autocnnp: {job}:{line}:")
    assert not (tmp_path / "out-job").exists()


def test_sbatch_missing_is_a_clear_error(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    job = tiny_job(tmp_path)
    rc, _, err = cli("submit", job)
    assert rc == 2
    assert "sbatch is not installed here" in err and "cluster/slurm/start.sh" in err
    assert not (tmp_path / "out-job").exists()


def test_status_of_a_job_never_submitted(cli, tmp_path):
    job = tiny_job(tmp_path)
    rc, _, err = cli("status", job)
    assert rc == 2 and "this job was never submitted to Slurm" in err and f"autocnnp submit {job}" in err


BATCH_ENV = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0",
             "SLURM_TASKS_PER_NODE": "2(x2)"}


def test_a_batch_script_is_not_a_rank_but_an_srun_task_is():
    assert launcher_name(BATCH_ENV) is None  # sbatch's script: run & manage starts the ranks from here
    step = {**BATCH_ENV, "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
            "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
    assert launcher_name(step) == "slurm"
    world = discover_world(step)
    assert (world.rank, world.world_size, world.local_rank, world.local_world_size) == (3, 4, 1, 2)
    assert discover_world({**step, "SLURM_STEP_TASKS_PER_NODE": "3,1"}).local_world_size == 3


def test_launch_commands_inside_an_allocation(tmp_path):
    job = load_job(tiny_job(tmp_path))
    assert launch_mode(job.launch, BATCH_ENV) == "mpirun"
    cmd, _ = build_command(job, BATCH_ENV)
    assert cmd[:3] == ["mpirun", "-np", "2"]
    srun = job.with_cluster({"launcher": "srun", "cpus_per_task": 2})
    cmd, env = build_command(srun, BATCH_ENV)
    assert cmd[:4] == ["srun", "--ntasks=2", "--cpus-per-task=2", "--kill-on-bad-exit=1"]
    assert cmd[-3:] == ["-m", "autocnnp.run.worker", str(job.spec.file)] and env["SLURM_MPI_TYPE"] == "pmix"
    outside, _ = build_command(srun, {})  # outside an allocation srun asks for one itself
    assert "--nodes=1" in outside and "--time=01:00:00" in outside


# --------------------------------------------------------------------------- with a real Slurm


def _slurm_up() -> str | None:
    """None when a Slurm controller answers with a usable node, else why not."""
    if shutil.which("sbatch") is None:
        return "sbatch is not installed"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo got no answer within 20 s"
    if proc.returncode != 0:
        return f"sinfo fails: {proc.stderr.strip()}"
    if not re.search(r"^(idle|mixed|allocated|completing)$", proc.stdout, re.M):
        return f"no usable node (sinfo: {proc.stdout.split()})"
    return None


@pytest.fixture(scope="module")
def slurm():
    why = _slurm_up()  # once: sinfo needs ~10 s to give up on a controller that is not there
    if why is None:
        return
    message = f"no Slurm cluster here ({why}); start the local one with cluster/slurm/start.sh"
    if os.environ.get("AUTOCNNP_REQUIRE_SLURM") == "1":
        pytest.fail(message + " (AUTOCNNP_REQUIRE_SLURM=1: Slurm tests must run)")
    pytest.skip(message)


AUTOCNNP = [sys.executable, "-m", "autocnnp"]


def autocnnp(*args, timeout: float = 60, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*AUTOCNNP, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def queued_ids() -> set[str]:
    return set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split())


def state_of(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return re.search(r"JobState=(\w+)", out).group(1)


@pytest.mark.parametrize("launcher,framework", [("mpirun", "torch"), ("srun", "torch"), ("srun", "tensorflow")])
@pytest.mark.slurm
@pytest.mark.ranks
def test_a_two_rank_job_trains_under_slurm(slurm, tmp_path, launcher, framework):
    if framework == "tensorflow":  # its ranks become TensorFlow workers over the MPI world srun starts
        require_import("tensorflow", "tensorflow", "AUTOCNNP_REQUIRE_TENSORFLOW")
    job = tiny_job(tmp_path)
    started = time.monotonic()
    sub = autocnnp("submit", job, "--launcher", launcher, "--time", "5", "--set", f"framework={framework}")
    assert sub.returncode == 0, sub.stderr
    job_id = re.search(r"submitted Slurm job (\d+) \(2 ranks on 1 node\(s\), partition \w+, launcher "
                       + launcher, sub.stdout).group(1)
    out = tmp_path / "out-job"
    assert (out / "slurm" / "job.json").is_file()
    done = autocnnp("status", job, "--wait", "--timeout", 240, timeout=300)
    log = (out / f"slurm-{job_id}.out").read_text()
    assert done.returncode == 0, done.stdout + done.stderr + log
    assert done.stdout.startswith(f"Slurm job {job_id}: COMPLETED (exit code 0:0)")
    assert state_of(job_id) == "COMPLETED"
    assert f"launcher {launcher}" in log and "epoch 1/1" in log
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1"] and 0 < float(rows[0]["dice"]) <= 1
    assert sorted(p.name for p in (out / "resources").iterdir()) == ["rank0.csv", "rank1.csv"]
    assert (out / "slurm" / f"{job_id}.exit").read_text().strip() == "0"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["plan"]["actions"][0] == {**manifest["plan"]["actions"][0], "type": "framework",
                                              "implementation": framework}
    assert manifest["world"] == {"size": 2, "backend": "gloo" if framework == "torch" else "tensorflow"}
    print(f"slurm {launcher} ({framework}): submit to COMPLETED in {time.monotonic() - started:.1f} s")


@pytest.mark.parametrize("by", ["job file", "job id"])
@pytest.mark.slurm
@pytest.mark.ranks
def test_status_and_cancel_follow_a_long_job(slurm, tmp_path, by):
    job = tiny_job(tmp_path, epochs=500)
    sub = autocnnp("submit", job)
    assert sub.returncode == 0, sub.stderr
    job_id = re.search(r"submitted Slurm job (\d+)", sub.stdout).group(1)
    try:
        deadline = time.monotonic() + 120
        while "progress: epoch" not in (st := autocnnp("status", job)).stdout:
            assert time.monotonic() < deadline, st.stdout + st.stderr
            time.sleep(1)
        assert st.returncode == 0 and st.stdout.startswith(f"Slurm job {job_id}: RUNNING, running for ")
        # a second submit of the same job would write into the same output folder: refused, nothing queued
        before = queued_ids()
        again = autocnnp("submit", job)
        assert again.returncode == 2 and f"Slurm job {job_id} from an earlier submit of this job is RUNNING" \
            in again.stderr
        assert queued_ids() == before
        cancel = autocnnp("cancel", job if by == "job file" else job_id, timeout=90)
        # cancel returned once the ranks were gone and run & manage had let go of the output folder
        assert str(job) not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert not is_held(RunDir(tmp_path / "out-job"))
        assert cancel.returncode == 0, cancel.stderr
        assert cancel.stdout.strip() == f"cancelled Slurm job {job_id} (was RUNNING, now CANCELLED)"
    finally:
        subprocess.run(["scancel", job_id])
    st = autocnnp("status", job_id)  # a job id leads to the run folder too
    assert st.stdout.startswith(f"Slurm job {job_id}: CANCELLED") and "progress: epoch" in st.stdout
    assert autocnnp("cancel", job).stdout.startswith(f"Slurm job {job_id} is not queued or running (CANCELLED)")


@pytest.mark.slurm
@pytest.mark.ranks
def test_the_time_limit_warning_checkpoints_and_requeues(slurm, tmp_path):
    job = tiny_job(tmp_path, epochs=500, cluster=prop("requeue", "true"))
    variant = ("--set", "output=variant")  # status and cancel follow the variant that was submitted
    sub = autocnnp("submit", job, *variant)
    assert sub.returncode == 0, sub.stderr
    job_id = re.search(r"submitted Slurm job (\d+)", sub.stdout).group(1)
    assert f"follow: autocnnp status --set output=variant {job}" in sub.stdout
    out = tmp_path / "variant"
    try:
        deadline = time.monotonic() + 120
        while "progress: epoch" not in (st := autocnnp("status", job, *variant)).stdout:
            assert time.monotonic() < deadline, st.stdout + st.stderr
            time.sleep(1)
        # what Slurm sends signal_before_s before the time limit (--signal=B:USR1@300), now
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        exit_file = out / "slurm" / f"{job_id}.exit"
        deadline = time.monotonic() + 60
        while not exit_file.exists():
            assert time.monotonic() < deadline, (out / f"slurm-{job_id}.out").read_text()
            time.sleep(0.5)
        assert exit_file.read_text().strip() == "75"
        log = (out / f"slurm-{job_id}.out").read_text()
        assert "autocnnp: stopped on request after epoch" in log and f"requeueing Slurm job {job_id}" in log
        with open(out / "metrics.csv") as f:
            done = len(list(csv.DictReader(f)))
        latest = (out / "checkpoints" / "latest").read_text().strip()
        assert latest == f"ckpt-epoch{done:04d}.pt"  # the checkpoint of the last epoch trained
        deadline = time.monotonic() + 30
        while "Restarts=1" not in subprocess.run(["scontrol", "show", "job", job_id], capture_output=True,
                                                 text=True).stdout:
            assert time.monotonic() < deadline, "the job was not requeued"
            time.sleep(0.5)
        cancel = autocnnp("cancel", job, *variant, timeout=90)
        assert cancel.returncode == 0 and cancel.stdout.startswith(f"cancelled Slurm job {job_id}"), cancel.stderr
    finally:
        subprocess.run(["scancel", job_id])


@pytest.mark.slurm
def test_unknown_partition_and_impossible_resources_submit_nothing(slurm, tmp_path):
    job = tiny_job(tmp_path, cluster=prop("partition", "gpu-large"))
    before = queued_ids()
    r = autocnnp("submit", job)
    line = next(i for i, t in enumerate(job.read_text().splitlines(), 1) if 'name="partition"' in t)
    assert r.returncode == 2 and r.stdout == ""
    assert re.fullmatch(rf"autocnnp: {job}:{line}:\d+: unknown Slurm partition 'gpu-large'\. Hint: "
                        r"(did you mean|valid choices are) .*\n", r.stderr)
    r = autocnnp("submit", job, "--partition", "", "--cpus-per-task", 4096)
    assert r.returncode == 2 and "Slurm refuses this job in partition" in r.stderr
    assert "Requested node configuration is not available" in r.stderr and "cpus_per_task=4096" in r.stderr
    assert queued_ids() == before
    assert not (tmp_path / "out-job" / "slurm" / "job.json").exists()
    assert not list((tmp_path / "out-job").rglob("sbatch-*.sh"))


def nothing_queued(r: subprocess.CompletedProcess, out: Path, before: set[str]) -> str:
    """The one-line refusal of a submit that queued nothing."""
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert queued_ids() == before
    assert not (out / "slurm").exists()
    return r.stderr


@pytest.mark.slurm
def test_what_run_checks_is_checked_before_anything_is_queued(slurm, tmp_path):
    job, out, before = tiny_job(tmp_path), tmp_path / "out-job", queued_ids()
    err = nothing_queued(autocnnp("submit", job, "--set", "hyperparameters.minibatch_size=64"), out, before)
    assert "each rank gets 4 of the 8 training samples, fewer than one minibatch of 64" in err
    from autocnnp.data.synth import write_synthetic_dataset

    ds = write_synthetic_dataset(tmp_path / "ds", "atrium", cases=3, shape=(12, 12, 6), seed=1)
    bad = sorted((ds / "imagesTr").iterdir())[1]
    bad.write_bytes(b"not a nifti file" * 8)
    data = f'<data format="decathlon"><train><path>{ds}</path></train></data>'
    bad_data = write_job(tmp_path / "bad.xml", output="out-job", arch=TINY_UNET, data=data, hyper=dict(minibatch_size=1))
    assert str(bad) in nothing_queued(autocnnp("submit", bad_data), out, before)
    assert "cannot be written" in nothing_queued(autocnnp("submit", job, "--set", f"output={job}/out"),
                                                 Path(f"{job}/out"), before)
    with owned(RunDir(out), None):  # a run of the same output folder is going on
        assert "is in use by another run" in nothing_queued(autocnnp("submit", job), out, before)


@pytest.mark.slurm
def test_setup_lines_run_in_the_batch_shell_and_the_first_that_fails_ends_the_job(slurm, tmp_path):
    setup = "\n".join(["export A=1; export B=2", "for m in x y; do echo \"setup $m; $A$B\"; done",
                       'test "$A$B" = 12', "false  # a module that does not load", "echo never"])
    job = tiny_job(tmp_path, cluster=prop("setup", setup))
    sub = autocnnp("submit", job, "--time", "5")
    assert sub.returncode == 0, sub.stderr
    job_id = re.search(r"submitted Slurm job (\d+)", sub.stdout).group(1)
    try:
        done = autocnnp("status", job, "--wait", "--timeout", 60, timeout=90)
    finally:
        subprocess.run(["scancel", job_id])
    out = tmp_path / "out-job"
    log = (out / f"slurm-{job_id}.out").read_text()
    assert done.returncode == 1 and done.stdout.startswith(f"Slurm job {job_id}: FAILED (exit code 2:0)"), log
    assert log.splitlines() == ["setup x; 12", "setup y; 12", "autocnnp: setup line 4 failed (exit code 1), training "
                                "not started: false  # a module that does not load"]
    assert (out / "slurm" / f"{job_id}.exit").read_text().strip() == "2" and not (out / "metrics.csv").exists()


@pytest.mark.slurm
def test_a_controller_that_does_not_answer(slurm, tmp_path):
    conf = Path("/etc/slurm/slurm.conf").read_text() if Path("/etc/slurm/slurm.conf").exists() else ""
    if "SlurmctldHost" not in conf:
        pytest.skip("needs the local test cluster's /etc/slurm/slurm.conf")
    bad = tmp_path / "slurm.conf"
    bad.write_text(re.sub(r"(?m)^SlurmctldPort=.*\n", "", conf) + "\nSlurmctldPort=1\nMessageTimeout=1\n")
    job = tiny_job(tmp_path)
    r = autocnnp("submit", job, env={**os.environ, "SLURM_CONF": str(bad)})
    assert r.returncode == 2 and "the Slurm controller does not answer" in r.stderr
    assert not (tmp_path / "out-job").exists()


@pytest.mark.slurm
def test_a_drained_node_is_reported_before_submitting(slurm, tmp_path):
    node = subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True).stdout.split()[0]
    if "," in node or "[" in node:
        pytest.skip("the local single-node cluster only")
    job = tiny_job(tmp_path)
    subprocess.run(["scontrol", "update", f"nodename={node}", "state=drain", "reason=autocnnp-test"], check=True)
    try:
        r = autocnnp("submit", job)
    finally:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], check=True)
    assert r.returncode == 2
    assert "the job needs 1 node(s) but partition" in r.stderr and "has 0 that can run jobs (1 drained)" in r.stderr
