"""Trackers: `files` (TensorBoard, plots) and `mlflow` (a local SQLite store by default, or a real `mlflow server`
started here), per-rank system metrics, a tracking server that is down (nothing lost: `autocnnp track sync`),
parent runs of `run --repeat`, and `autocnnp dashboard` stopped with every process it started."""

from __future__ import annotations

import json
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


def tracked_job(tmp_path: Path, tracker: str = "files,mlflow", extra: str = "", **hyper) -> Path:
    monitoring = (f'<monitoring><property name="tracker">{tracker}</property><property name="progress">false</property>'
                  f'<property name="sample_interval_s">0.2</property><property name="system_interval_s">0.5</property>'
                  f'{extra}</monitoring>')
    return write_job(tmp_path / "job.xml", output="runs/out", arch=TINY_UNET, data=DATA, hyper={**HYPER, **hyper},
                     extra=monitoring)


def autocnnp(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autocnnp", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def the_run(client: MlflowClient, experiment: str = "job"):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


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
    unsent = autocnnp("track", "sync", rundir)  # to the store the job named, still down: never a local one
    assert unsent.returncode == 2 and f"the MLflow store http://127.0.0.1:{port} cannot" in unsent.stderr
    assert not (tmp_path / "runs" / "mlflow").exists()
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
    """Live processes of a session (the dashboard's: the server and what it started)."""
    return _running("", sid)


def _running(command: str, sid: int | None = None) -> list[int]:
    """Live processes whose command line holds ``command`` (of session ``sid``)."""
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                proc = Path(f"/proc/{entry}")
                if ((sid is None or os.getsid(int(entry)) == sid) and command.encode() in (proc / "cmdline").read_bytes()
                        and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"):
                    alive.append(int(entry))
            except OSError:
                pass
    return alive


def journal_run(rundir: Path, *events: tuple[str, dict]) -> Path:
    """A run folder whose mlflow journal holds a start and then ``events``."""
    from autocnnp.components.trackers.mlflow_tracking import JOURNAL, Journal

    journal = Journal(rundir / "tracking" / JOURNAL)
    journal.add("start", name="job", run_name=rundir.name, params={"lr": 0.1}, tags={}, artifacts={}, parent=None)
    for kind, event in events:
        journal.add(kind, **event)
    return rundir


def test_every_end_of_a_run_closes_its_mlflow_run_once(tmp_path, cli):
    from autocnnp.components.trackers.mlflow_tracking import Sender, close_journal

    ends = {"completed": "FINISHED", "failed": "FAILED", "diverged": "FAILED", "stopped": "KILLED",
            "terminated": "KILLED", "killed": "KILLED"}
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    for status, expected in ends.items():
        rundir = journal_run(tmp_path / status, ("epoch", dict(step=1, values={"dice_fg": 0.5})))
        assert close_journal(rundir, status) and not close_journal(rundir, "failed")  # once: rank 0 or run & manage
        sender = Sender(rundir, uri)
        sender.send()
        run = MlflowClient(uri).get_run(sender.state["run_id"])
        assert (run.info.status, run.data.metrics["dice_fg"]) == (expected, 0.5), status
        assert run.info.end_time and run.info.end_time >= run.info.start_time
    restarted = Sender(journal_run(tmp_path / "completed"), uri)  # a restart: the same MLflow run, running again
    restarted.send()
    assert MlflowClient(uri).get_run(restarted.state["run_id"]).info.status == "RUNNING"
    rc, _, err = cli("track", "sync", tmp_path / "completed")  # nobody holds the run: it was killed
    assert rc == 0 and "closing it as KILLED" in err
    assert MlflowClient(uri).get_run(restarted.state["run_id"]).info.status == "KILLED"


def test_runs_show_as_model_training_in_mlflow_ui(tmp_path):
    from autocnnp.components.trackers.mlflow_tracking import Sender

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    client = MlflowClient(uri)
    client.create_experiment("job")  # made by an earlier version, or by hand: MLflow 3 opens it as GenAI
    Sender(journal_run(tmp_path / "a"), uri).send()
    Sender(journal_run(tmp_path / "b"), uri, "other").send()
    for name in ("job", "other"):
        assert client.get_experiment_by_name(name).tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_sender_sends_an_epoch_at_once_and_records_the_store_first(tmp_path):
    from autocnnp.components.trackers.mlflow_tracking import JOURNAL, Config, Follower, Journal, Sender

    port = free_port()  # nothing listens there
    down = Follower(journal_run(tmp_path / "down"), Config(tracking_uri=f"http://127.0.0.1:{port}"))
    down.stop()
    assert Sender(tmp_path / "down").uri == f"http://127.0.0.1:{port}"  # `track sync` goes there, not to SQLite
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    client, run = MlflowClient(uri), None
    client.search_experiments()  # the store made here: two processes must not make it at once
    rundir = journal_run(tmp_path / "up")
    follower = Follower(rundir, Config(tracking_uri=uri, system_interval_s=600))
    try:
        deadline = time.monotonic() + 60
        while run is None and time.monotonic() < deadline:  # the run exists before the first interval
            time.sleep(0.2)
            experiment = client.get_experiment_by_name("job")
            run = experiment and next(iter(client.search_runs([experiment.experiment_id])), None)
        assert run is not None
        Journal(rundir / "tracking" / JOURNAL).add("epoch", step=1, values={"dice_fg": 0.25})
        sent = time.monotonic()
        while not client.get_run(run.info.run_id).data.metrics and time.monotonic() < sent + 10:
            time.sleep(0.2)
        assert client.get_run(run.info.run_id).data.metrics == {"dice_fg": 0.25}
    finally:
        follower.stop()


@pytest.mark.ranks
def test_every_way_a_run_ends_ends_its_mlflow_run(tmp_path):
    """Its ranks killed: FAILED; run & manage stopped by SIGTERM (kill, scancel): KILLED, and a resumed run goes
    on with the same MLflow run; run & manage killed by SIGKILL: `track sync` closes it as KILLED. Each with its
    end time."""
    job = tracked_job(tmp_path, "mlflow", end_epoch=50)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow' / 'mlflow.db'}")
    for target, sig, status in (("ranks", signal.SIGKILL, "FAILED"), ("run", signal.SIGTERM, "KILLED"),
                                ("run", signal.SIGKILL, "RUNNING")):
        run = subprocess.Popen([sys.executable, "-m", "autocnnp", "run", str(job)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            for line in run.stdout:  # until an epoch is done: the run is in MLflow
                if line.startswith("epoch"):
                    break
            for pid in [run.pid] if target == "run" else _running(f"autocnnp.run.worker\0{job}"):
                os.kill(pid, sig)
            run.wait(90)
            deadline = time.monotonic() + 60
            while _in_session(run.pid) and time.monotonic() < deadline:  # the sender sends what it has, and ends
                time.sleep(0.2)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
        (mlflow_run,) = the_run(client)
        assert mlflow_run.info.status == status, (target, sig)
        assert mlflow_run.info.end_time or status == "RUNNING"
    assert autocnnp("track", "sync", tmp_path / "runs" / "out").returncode == 0
    (mlflow_run,) = the_run(client)
    assert mlflow_run.info.status == "KILLED" and mlflow_run.info.end_time


@pytest.mark.ranks
def test_the_user_stops_a_run_from_the_dashboard(tmp_path):
    """The MLflow UI's run tag autocnnp.stop: the ranks stop at the epoch's end with a checkpoint, as Ctrl-C does,
    exit 75, recorded as stopped by the user; the tag is taken off, so the same command resumes the run. The
    ranks' resources are one view in the run (plots/resources.png), without the files tracker too."""
    job = tracked_job(tmp_path, "mlflow", end_epoch=50)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow' / 'mlflow.db'}")
    run = subprocess.Popen([sys.executable, "-m", "autocnnp", "run", str(job)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert run.stdout.readline().startswith("epoch 1/50")
        deadline = time.monotonic() + 60
        while not (runs := the_run(client)) and time.monotonic() < deadline:
            time.sleep(0.2)
        client.set_tag(runs[0].info.run_id, "autocnnp.stop", "enough")
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 75 and "asked by the user, from the dashboard" in err, err[-2000:]
    epochs = int(out.strip().splitlines()[-1].split()[1].split("/")[0])
    assert epochs < 50 and (tmp_path / "runs" / "out" / "checkpoints").is_dir()
    manifest = json.loads((tmp_path / "runs" / "out" / "manifest.json").read_text())
    assert manifest["status"] == "stopped" and "the user, from the dashboard" in manifest["invocations"][-1]["message"]
    (mlflow_run,) = the_run(client)
    assert mlflow_run.info.status == "KILLED" and "autocnnp.stop" not in mlflow_run.data.tags
    assert mlflow_run.data.tags["autocnnp.stopped_by"].startswith("the user, from the dashboard")
    plots = {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "plots")}
    assert "plots/resources.png" in plots  # every rank's step time, data wait, CPU and memory in one view, live
