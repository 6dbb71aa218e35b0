"""Trackers: `files` (TensorBoard, plots) and `mlflow` (a local SQLite store by default, or a real `mlflow server`
started here), per-rank system metrics, a tracking server that is down (nothing lost: `autocnnp track sync`),
parent runs of `run --repeat`, and `autocnnp dashboard` stopped with every process it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobfiles import TINY_UNET, synthetic_data, write_job

pytest.importorskip("mlflow", reason="mlflow is pinned in requirements/test.txt (make venv)")
from mlflow.tracking import MlflowClient  # noqa: E402

DATA = synthetic_data(16, 4, size=16)
HYPER = dict(minibatch_size=2, end_epoch=3, lr=0.05, optimiser="sgd")


def tracked_job(tmp_path: Path, tracker: str = "files,mlflow", extra: str = "") -> Path:
    monitoring = (f'<monitoring><property name="tracker">{tracker}</property><property name="progress">false</property>'
                  f'<property name="sample_interval_s">0.2</property><property name="system_interval_s">0.5</property>'
                  f'{extra}</monitoring>')
    return write_job(tmp_path / "job.xml", output="runs/out", arch=TINY_UNET, data=DATA, hyper=HYPER, extra=monitoring)


def autocnnp(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autocnnp", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def the_run(client: MlflowClient, experiment: str = "job"):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return runs


def test_trackers_are_checked_with_the_job(cli, tmp_path):
    rc, _, err = cli("validate", tracked_job(tmp_path, "files,mlfow"))
    assert rc == 2 and "unknown tracker 'mlfow'" in err and "mlflow" in err
    rc, _, err = cli("validate", tracked_job(tmp_path, "mlflow", extra='<property name="plots">false</property>'))
    assert rc == 2 and "<monitoring> has no property 'plots'" in err  # a files setting without the files tracker
    assert cli("validate", tracked_job(tmp_path, "mlflow", '<property name="experiment">x</property>'))[0] == 0


def test_validate_and_a_files_run_never_import_mlflow(tmp_path):
    code = ("import sys; from autocnnp.cli import main; rc = main(['validate', sys.argv[1]]); "
            "sys.exit(rc or ('mlflow' in sys.modules) * 7)")
    assert subprocess.run([sys.executable, "-c", code, str(tracked_job(tmp_path))]).returncode == 0


@pytest.mark.ranks
def test_a_two_rank_run_in_the_local_store(tmp_path):
    job = tracked_job(tmp_path)
    done = autocnnp("run", job)
    assert done.returncode == 0, done.stderr[-3000:]
    store = tmp_path / "runs" / "mlflow"
    assert (store / "mlflow.db").is_file() and "cannot be reached" not in done.stderr
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    (run,) = the_run(client)
    assert run.info.status == "FINISHED" and run.data.tags["strategy"] == "ring_allreduce"
    assert run.data.tags["degree"] == "2" and run.data.tags["host.rank1"] == socket.gethostname()
    assert run.data.params["hyperparameters.minibatch_size"] == "2" and run.data.params["dist_strategy"] == "ring_allreduce"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "dice_fg")] == [1, 2, 3]
    for rank in (0, 1):  # both ranks' system metrics, sampled while training
        for name in ("cpu_percent", "rss_mb", "step_ms", "data_wait_ms"):
            assert client.get_metric_history(run.info.run_id, f"system/rank{rank}/{name}"), (rank, name)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifest.json", "metrics.csv", "plan.json", "plots", "job", "checkpoints"} <= artifacts
    assert (tmp_path / "runs" / "out" / "tensorboard").is_dir()  # the files tracker too


@pytest.mark.ranks
def test_a_server_that_is_down_loses_nothing(tmp_path):
    port = free_port()  # nothing listens there
    job = tracked_job(tmp_path, "mlflow", f'<property name="tracking_uri">http://127.0.0.1:{port}</property>')
    done = autocnnp("run", job)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count(f"the MLflow store http://127.0.0.1:{port} cannot be reached") == 1
    rundir = tmp_path / "runs" / "out"
    assert (rundir / "tracking" / "mlflow-events.jsonl").stat().st_size > 0
    store = tmp_path / "later.db"
    synced = autocnnp("track", "sync", rundir, "--tracking-uri", f"sqlite:///{store}")
    assert synced.returncode == 0, synced.stderr
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = the_run(client)
    assert run.info.status == "FINISHED" and len(client.get_metric_history(run.info.run_id, "dice_fg")) == 3
    assert (tmp_path / "artifacts").is_dir() and not Path("mlruns").exists()  # beside the database, not in cwd
    again = autocnnp("track", "sync", rundir, "--tracking-uri", f"sqlite:///{store}")
    assert again.returncode == 0 and "sent 0 event(s)" in again.stdout  # nothing twice


@pytest.mark.ranks
def test_repeats_are_children_of_one_run(tmp_path):
    job = tracked_job(tmp_path, "mlflow")
    done = autocnnp("run", "--repeat", 2, job)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'out' / 'mlflow' / 'mlflow.db'}")
    runs = the_run(client)
    parent = [r for r in runs if r.info.run_name == "out"]
    children = [r for r in runs if r.info.run_name.startswith("seed-")]
    assert len(parent) == 1 and sorted(r.info.run_name for r in children) == ["seed-0", "seed-1"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in children)


@pytest.mark.ranks
def test_dashboard_serves_a_run_from_a_real_server_and_stops_every_process(tmp_path):
    port = free_port()
    dash = subprocess.Popen([sys.executable, "-m", "autocnnp", "dashboard", "--store", tmp_path / "store",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        line = dash.stdout.readline()
        assert line.startswith(f"autocnnp dashboard: http://127.0.0.1:{port}"), line
        uri = f"http://127.0.0.1:{port}"
        job = tracked_job(tmp_path, "mlflow", f'<property name="tracking_uri">{uri}</property>')
        done = autocnnp("run", job)
        assert done.returncode == 0 and "cannot be reached" not in done.stderr, done.stderr[-3000:]
        (run,) = the_run(MlflowClient(uri))
        assert run.info.status == "FINISHED" and "system/rank1/cpu_percent" in run.data.metrics
        dash.send_signal(signal.SIGINT)
        assert dash.wait(60) == 0
        deadline = time.monotonic() + 10
        while _in_session(dash.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _in_session(dash.pid), "mlflow server processes outlived the dashboard"
    finally:
        if dash.poll() is None:
            os.killpg(dash.pid, signal.SIGKILL)


def _in_session(sid: int) -> list[int]:
    """Live processes of the dashboard's session (the server and what it started)."""
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid and Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(int(entry))
            except OSError:
                pass
    return alive
