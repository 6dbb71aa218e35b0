"""``tracker=mlflow``: the run in MLflow (R2D2's live web monitoring: ``autocnnp dashboard``).

Every event is written first to a journal in the run folder (``OUTPUT/tracking/mlflow-events.jsonl``); a
sender process sends what is new to the tracking store every ``system_interval_s`` seconds, and an epoch's
metrics at once, with the ranks' resource samples (``OUTPUT/resources/rankN.csv``: CPU, RSS, GPU, step time,
time waiting for data) as ``system/rankN/...`` metrics. Run & manage starts the sender and writes the run's
start before the ranks start (the run is in MLflow while they prepare the data) and its end however they
end; rank 0 writes the metrics. Ranks without run & manage (in place, a swarm) start the sender from rank 0.
A store that does not answer never stops training: the user is told once, the journal keeps everything,
and ``autocnnp track sync OUTPUT`` sends it later. Where the journal has got to, which store it goes to
(recorded when the run starts) and which MLflow run it feeds, is kept in ``OUTPUT/tracking/mlflow.json``.

The default store is a SQLite database and an artifact folder beside the run (``OUTPUT/../mlflow/``), so
nothing has to be started; ``tracking_uri`` points a team at a shared ``mlflow server``. mlflow is
imported by the sender only: a training process never imports it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from autocnnp.core.files import WriteRefused, append_text, atomic_write, read_json, write_json
from autocnnp.core.processes import die_with_parent
from autocnnp.core.rundir import RunDir, start_checkpoint
from autocnnp.core.settings import setting
from autocnnp.generator.protocols import RunInfo, Tracker
from autocnnp.generator.registry import component

JOURNAL, STATE = "mlflow-events.jsonl", "mlflow.json"
STATUS = {"completed": "FINISHED", "failed": "FAILED", "diverged": "FAILED", "stopped": "KILLED", "terminated": "KILLED",
          "killed": "KILLED"}
SYSTEM_COLUMNS = ("cpu_percent", "rss_mb", "gpu_util_percent", "gpu_mem_mb", "step_ms", "data_wait_ms",
                  "collective_wait_ms")
BATCH = 900  # metrics per request (MLflow accepts 1,000)
STOP_TAG, STOPPED_TAG = "autocnnp.stop", "autocnnp.stopped_by"  # a stop asked for in the MLflow UI, and who asked
FOLLOWED = "AUTOCNNP_TRACKING_FOLLOWED"  # the run folder whose journal run & manage's sender follows
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3's UI: model training, not GenAI
TICK_S = 0.5  # how often the sender looks for a new epoch in the journal
RESOURCES_PLOT_S = 30.0  # how often the sender renders every rank's resources into one view (plots/resources.png)
SENDER_NICE = 10  # the sender's CPU priority once the run exists (its start is at the ranks' priority)


@dataclass
class Config:
    """An MLflow tracking store: by default a local SQLite database beside the runs."""

    tracking_uri: str = setting("", help="MLflow tracking URI (http://host:5000, sqlite:///path.db, ...); empty: "
                                         "OUTPUT/../mlflow/mlflow.db with its artifacts beside it")
    experiment: str = setting("", help="MLflow experiment (default: the job file's name)")
    system_interval_s: float = setting(5.0, min=0.5, help="seconds between two sends (resource samples included)")


def store_of(rundir: Path, tracking_uri: str = "") -> tuple[str, Path | None]:
    """(tracking URI, artifact folder for new experiments, or None for a server's own) of a run folder: a SQLite
    store keeps its artifacts beside its database, never in the current folder."""
    if not tracking_uri:
        tracking_uri = f"sqlite:///{Path(rundir).resolve().parent / 'mlflow' / 'mlflow.db'}"
    if tracking_uri.startswith("sqlite:///"):
        return tracking_uri, Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "artifacts"
    return tracking_uri, None


class Journal:
    """Append-only JSON lines, safe to write from several threads."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, kind: str, **event) -> None:
        line = json.dumps({"kind": kind, "time": time.time(), **event}, allow_nan=True) + "\n"
        with self._lock:
            append_text(self.path, line)

    def is_open(self) -> bool:
        """Whether the last run that started here has not ended (its end event is missing)."""
        last = None
        with contextlib.suppress(FileNotFoundError), open(self.path) as f:
            for line in f:
                if line.startswith(('{"kind": "start"', '{"kind": "end"')):
                    last = line
        return last is not None and last.startswith('{"kind": "start"')

    def has_after(self, offset: int, kinds: tuple[str, ...]) -> bool:
        """Whether an event of one of ``kinds`` was written after byte ``offset``."""
        with contextlib.suppress(FileNotFoundError), open(self.path) as f:
            f.seek(offset)
            text = f.read()
            return any(f'{{"kind": "{kind}"' in text for kind in kinds)
        return False


class Sender:
    """Sends a run folder's journal to its MLflow store from where it last stopped (``mlflow.json``)."""

    def __init__(self, rundir: Path, tracking_uri: str = "", experiment: str = ""):
        self.rundir = Path(rundir)
        self.folder = RunDir(self.rundir).tracking
        self.state = read_json(self.folder / STATE) or {"offset": 0}
        self.given_uri = tracking_uri or self.state.get("tracking_uri", "")
        self.uri, self.artifacts = store_of(self.rundir, self.given_uri)
        self.experiment = experiment or self.state.get("experiment", "")
        self._client = None

    def client(self):
        if self._client is None:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a server that is down: fail fast
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # ours goes to stderr, once
            from mlflow.tracking import MlflowClient

            logging.getLogger("mlflow").setLevel(logging.WARNING)  # not the store's table creation on the console

            if self.artifacts is not None:
                self.artifacts.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def send(self) -> int:
        """Send every journal line not sent yet; returns how many. Raises when the store does not answer."""
        path = self.folder / JOURNAL
        if not path.exists():
            return 0
        with open(path) as f:
            f.seek(self.state["offset"])
            lines = f.readlines()
        complete = [ln for ln in lines if ln.endswith("\n")]  # a line being written is sent next time
        events = [json.loads(ln) for ln in complete]
        for lo in range(0, len(events), BATCH):
            self._send(events[lo:lo + BATCH])
            self.state["offset"] += sum(len(ln.encode()) for ln in complete[lo:lo + BATCH])
            self.save()
        return len(events)

    def save(self) -> None:
        """Record where the journal has got to and the store it goes to (also before the store first answers)."""
        write_json(self.folder / STATE, {**self.state, "tracking_uri": self.given_uri,
                                         "experiment": self.experiment})

    def _run(self, start: dict) -> str:
        """The MLflow run this folder feeds (created at its first event; a resumed run goes on with it)."""
        client = self.client()
        if self.state.get("run_id"):
            client.update_run(self.state["run_id"], status="RUNNING")
            return self.state["run_id"]
        name = self.experiment or start["name"]
        self.experiment = name
        found = client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else client.create_experiment(
            name, artifact_location=self.artifacts.as_uri() if self.artifacts else None, tags=EXPERIMENT_KIND)
        if found and not any(key in found.tags for key in EXPERIMENT_KIND):  # made by an earlier version
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(experiment, key, value)
        tags = {"mlflow.runName": start["run_name"], "autocnnp.rundir": str(self.rundir), **start["tags"]}
        parent = start.get("parent")
        if parent:
            tags["mlflow.parentRunId"] = Sender(Path(parent), self.uri, name).parent_run()  # in the same store
        run = client.create_run(experiment, start_time=int(start["time"] * 1000), tags=tags)
        self.state["run_id"] = run.info.run_id
        self.save()
        if self.uri.startswith("http"):
            print(f"autocnnp: MLflow run at {self.uri.rstrip('/')}/#/experiments/{experiment}/runs/{run.info.run_id}",
                  file=sys.stderr, flush=True)
        return run.info.run_id

    def log_resources(self) -> None:
        """Every rank's step time, data wait, CPU and memory as one view, the run's ``plots/resources.png``."""
        from autocnnp.training.monitor import plot_resources

        plot = plot_resources(RunDir(self.rundir), self.folder / "resources.png")
        if plot is not None and self.state.get("run_id"):
            self.client().log_artifact(self.state["run_id"], str(plot), "plots")

    def stop_requested(self) -> str | None:
        """Who asked, when the MLflow run carries the stop tag (set in the UI): the tag is taken off (a resumed run
        goes on) and the stop recorded on the run."""
        run_id = self.state.get("run_id")
        value = self.client().get_run(run_id).data.tags.get(STOP_TAG) if run_id else None
        if value is None:
            return None
        who = f"the user, from the dashboard (tag {STOP_TAG}={value})"
        self.client().delete_tag(run_id, STOP_TAG)
        self.client().set_tag(run_id, STOPPED_TAG, who)
        return who

    def parent_run(self) -> str:
        """The MLflow run of this folder as a parent (repeats, tuning iterations, a federation): its own run, else
        one created and ended."""
        if self.state.get("run_id"):
            return self.state["run_id"]
        run_id = self._run({"name": self.experiment, "run_name": self.rundir.name, "tags": {},
                            "time": time.time()})
        self.client().set_terminated(run_id, "FINISHED")
        return run_id

    def _send(self, events: list[dict]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = self.client()
        metrics, params, tags = [], [], []
        for event in events:
            kind = event["kind"]
            if kind in ("start", "end"):
                self.state["running"] = kind == "start"  # whether the run goes on (a stop request is for it)
            if kind == "start":
                run_id = self._run(event)
                if not self.state.get("params_logged"):
                    params += [Param(k, str(v)[:6000]) for k, v in event["params"].items()]
                    self.state["params_logged"] = True
                for artifact, path in event["artifacts"].items():
                    with contextlib.suppress(OSError):
                        client.log_artifact(run_id, path, "job" if artifact != "plan" else None)
            elif kind in ("metrics", "epoch"):
                ms = int(event["time"] * 1000)
                metrics += [Metric(k, float(v), ms, int(event["step"])) for k, v in event["values"].items()]
            elif kind == "tags":
                tags += [RunTag(k, str(v)) for k, v in event["values"].items()]
            elif kind == "artifacts":
                for path, where in event["files"]:
                    if Path(path).is_file():
                        client.log_artifact(self.state["run_id"], path, where)
            elif kind == "end":
                self._flush(metrics, params, tags)
                metrics, params, tags = [], [], []
                client.set_terminated(self.state["run_id"], STATUS.get(event["status"], "FAILED"),
                                      end_time=int(event["time"] * 1000))
        self._flush(metrics, params, tags)

    def _flush(self, metrics, params, tags) -> None:
        """log_batch within MLflow's limits (1,000 metrics, 100 params, 100 tags a request)."""
        run_id, client = self.state["run_id"], self.client()
        for lo in range(0, len(metrics), BATCH):
            client.log_batch(run_id, metrics=metrics[lo:lo + BATCH])
        for lo in range(0, max(len(params), len(tags)), 100):
            client.log_batch(run_id, params=params[lo:lo + 100], tags=tags[lo:lo + 100])


class SystemTail:
    """New rows of the ranks' resource samples, as ``system/rankN/...`` metrics events."""

    def __init__(self, rundir: RunDir):
        self.rundir = rundir
        self.offsets: dict[Path, int] = {}
        self.steps: dict[int, int] = {}
        self.hosts: dict[int, str] = {}

    def read(self, journal: Journal) -> None:
        for path in self.rundir.all_resource_samples():
            with open(path, newline="") as f:
                header = f.readline()
                f.seek(max(self.offsets.get(path, 0), len(header)))
                block = f.read()
            complete = block[:block.rfind("\n") + 1]
            self.offsets[path] = max(self.offsets.get(path, 0), len(header)) + len(complete.encode())
            for row in csv.DictReader([header, *complete.splitlines()]):
                self._event(row, journal)

    def _event(self, row: dict, journal: Journal) -> None:
        rank = int(row["rank"])
        if row.get("host") and self.hosts.get(rank) != row["host"]:
            self.hosts[rank] = row["host"]
            journal.add("tags", values={f"host.rank{rank}": row["host"]})
        values = {f"system/rank{rank}/{c}": float(row[c]) for c in SYSTEM_COLUMNS if row.get(c)}
        step = self.steps.get(rank, 0)
        self.steps[rank] = step + 1
        journal.add("metrics", step=step, values=values, time=float(row["time_s"]))


def start_event(info: RunInfo) -> dict:
    """The journal's ``start`` event of a run (params, tags, the files logged first, its parent)."""
    return dict(name=info.name, run_name=info.rundir.name, params=info.params, tags=info.tags,
                artifacts={k: str(v) for k, v in info.artifacts.items()},
                parent=str(info.parent) if info.parent else None)


def end_artifacts(rundir: Path) -> list[list]:
    """What a run logs when it ends: plots, manifest, metrics.csv and the best (else latest) checkpoint (what the
    zoo registers)."""
    run = RunDir(rundir)
    files = [[str(p), "plots"] for p in sorted(run.plots.glob("*.png"))]
    files += [[str(p), None] for p in (run.manifest, run.metrics) if p.is_file()]
    model = start_checkpoint(run.checkpoints)
    return files + ([[str(model), "checkpoints"]] if model else [])


class Follower:
    """The sender process of a run folder, started with the store recorded (``track sync`` sends there even
    when the store never answered during the run)."""

    def __init__(self, rundir: Path, config: Config):
        Sender(rundir, config.tracking_uri, config.experiment).save()
        # a process of its own: training keeps its cores and never imports mlflow
        self.process = subprocess.Popen([sys.executable, "-m", __name__, str(rundir), config.tracking_uri,
                                         config.experiment, str(config.system_interval_s)],
                                        stdin=subprocess.DEVNULL, preexec_fn=_background)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Send what is left, then end (a store that is down keeps the journal for ``autocnnp track sync``)."""
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def close_journal(rundir: Path, status: str, last_word: bool = False) -> bool:
    """End the run that last started in the folder's journal with ``status`` (and log what a run logs at its
    end) unless it has ended; returns whether it was open. Run & manage ends its runs, rank 0 those it started
    itself, and ``track sync`` one whose end was never written (run & manage or rank 0 killed): with
    ``last_word``, the end time is that of the journal's last event (a run found dead later)."""
    journal = Journal(RunDir(rundir).tracking / JOURNAL)
    if not journal.is_open():
        return False
    at = {"time": journal.path.stat().st_mtime} if last_word else {}
    journal.add("artifacts", files=end_artifacts(rundir))
    journal.add("end", status=status, **at)
    return True


class FrontEnd:
    """Run & manage's side of a tracked run: the sender runs from before the ranks start until they are all
    gone; each attempt (a restart's too) starts the MLflow run and every way it ends closes it. The ranks'
    environment gets ``environment`` (rank 0 then writes the metrics only)."""

    def __init__(self, config: Config, info: RunInfo):
        self.info = info
        self.environment = {FOLLOWED: str(info.rundir)}
        self.follower = Follower(info.rundir, config)

    def started(self) -> None:
        Journal(RunDir(self.info.rundir).tracking / JOURNAL).add("start", **start_event(self.info))

    def ended(self, status: str) -> None:
        close_journal(self.info.rundir, status)

    def close(self) -> None:
        self.follower.stop()


@component("mlflow", frameworks=("torch", "tensorflow"))
class MLflow(Tracker):
    """The run in MLflow: params (the resolved plan), tags, per-epoch metrics, the step loss, every rank's
    system metrics live, and plots, manifest and the best (else latest) checkpoint at the end."""

    def __init__(self, config: Config, *, info: RunInfo):
        super().__init__(config, info=info)
        self.journal = Journal(RunDir(info.rundir).tracking / JOURNAL)
        self.follower = None
        if os.environ.get(FOLLOWED) != str(info.rundir):  # no run & manage: this rank starts the run and sender
            self.journal.add("start", **start_event(info))
            self.follower = Follower(info.rundir, config)

    def step(self, global_step: int, loss: float) -> None:
        self.journal.add("metrics", step=global_step, values={"train/loss_step": loss})

    def epoch_end(self, epoch: int, metrics: dict[str, float], global_step: int) -> None:
        self.journal.add("epoch", step=epoch + 1, values=metrics)  # the sender sends it at once

    def straggler(self, epoch: int, rank: int, step_s: float, median_s: float) -> None:
        self.journal.add("tags", values={f"straggler.rank{rank}": f"from epoch {epoch + 1}: own work per step "
                                         f"{1000 * step_s:.0f} ms, {step_s / median_s:.1f} x the ranks' median"})

    def close(self, status: str) -> None:
        """End the run where this rank started it; under run & manage the job's exit ends it (FrontEnd.ended),
        never the ranks: training that outlived run & manage, or a rank whose peers failed, did not complete."""
        if self.follower is not None:
            close_journal(self.info.rundir, status)
            self.follower.stop()


def _background() -> None:
    """In the sender: a process group of its own (the launcher's signals to the rank's group, or a terminal's
    Ctrl-C, are not for it: whoever started it tells it when to finish) and an end with its parent."""
    os.setpgrp()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # held until follow() listens for it
    die_with_parent(signal.SIGTERM)


def follow(rundir: Path, tracking_uri: str, experiment: str, interval_s: float) -> int:
    """The sender: every ``interval_s``, and as soon as an epoch ends, turn new resource samples into events and
    send the journal, and pass on a stop asked for in the MLflow UI (the run's tag ``autocnnp.stop``, any value)
    as run & manage's stop request; every ``RESOURCES_PLOT_S`` the ranks' resources as one view; on SIGTERM (the
    run ended, or its starter is gone) send what is left and end. Tells once when the store is down. It starts
    at its starter's CPU priority (the run is in MLflow at once) and then leaves the cores to training."""
    journal = Journal(RunDir(rundir).tracking / JOURNAL)
    sender, tail = Sender(rundir, tracking_uri, experiment), SystemTail(RunDir(rundir))
    warned, failing, niced, due, plotted = False, False, False, 0.0, 0.0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    while True:
        stopping = stop.wait(0 if due == 0.0 else TICK_S)
        urgent = not failing and journal.has_after(sender.state["offset"], ("start", "epoch"))
        if not (stopping or urgent or time.monotonic() >= due):
            continue
        due = time.monotonic() + interval_s
        try:
            sender.client()  # the first time: mlflow and the store, before the first event
            tail.read(journal)
            sender.send()
            if not stopping and sender.state.get("running") and (who := sender.stop_requested()):
                atomic_write(RunDir(rundir).stop_request, who + "\n")  # the ranks stop at the epoch's end
            if sender.state.get("run_id") and (stopping or time.monotonic() >= plotted + RESOURCES_PLOT_S):
                plotted = time.monotonic()
                sender.log_resources()
            failing = False
        except WriteRefused:  # a full disk: not the store's fault, and the rank's own writes say so
            pass
        except Exception as exc:  # noqa: BLE001 - the store is down, refuses, or mlflow is missing
            failing = True
            if not warned:
                warned = True
                print(f"autocnnp: note: the MLflow store {sender.uri} cannot be reached ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); training goes on, its events are kept "
                      f"in {journal.path.parent} and `autocnnp track sync {rundir}` sends them", file=sys.stderr,
                      flush=True)
        if not niced and sender.state.get("run_id"):
            niced = True
            os.nice(SENDER_NICE)
        if stopping:
            return 0


if __name__ == "__main__":
    sys.exit(follow(Path(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])))
