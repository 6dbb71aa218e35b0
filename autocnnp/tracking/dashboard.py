"""MLflow around the runs: ``autocnnp dashboard`` (the web UI on the project's store, live) and
``autocnnp track sync`` (send what a tracker could not, e.g. while the tracking server was down).

* ``autocnnp dashboard [JOB.xml] [--store DIR | --tracking-uri URI] [--host H] [--port P]``
* ``autocnnp track sync RUN_DIR [--tracking-uri URI]`` (a run killed with SIGKILL: its MLflow run is closed as KILLED)

The dashboard is ``mlflow server`` started in a session of its own and stopped with everything it
started (it leaves helper processes behind when only the server is killed); it serves until Ctrl-C.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..core.errors import Interrupted, JobError
from ..core.rundir import RunDir
from ..run import processes
from ..run.job import load_job
from ..run.lock import is_held
from . import Sender, close_journal, store_of

START_TIMEOUT_S = 120.0
MLFLOW_HINT = "install it with `make venv` (requirements/test.txt pins mlflow) or pip install mlflow"


def _store(args) -> tuple[str, Path | None]:
    """The store the dashboard shows: --tracking-uri, --store DIR, the job's mlflow tracker, or beside its runs."""
    if args.tracking_uri or args.store:
        return store_of(Path.cwd(), args.tracking_uri or f"sqlite:///{Path(args.store).expanduser().resolve() / 'mlflow.db'}")
    if args.job is None:
        raise JobError(Path("."), "the dashboard needs a store", "name a job file, --store DIR or --tracking-uri URI")
    job = load_job(args.job, args.set)
    mlflow = job.tracker("mlflow")
    return store_of(job.rundir.root, mlflow.tracking_uri if mlflow else "")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def cmd_dashboard(args) -> int:
    uri, artifacts = _store(args)
    if importlib.util.find_spec("mlflow") is None:
        raise JobError(Path(args.job or "."), "the dashboard needs MLflow, which is not installed", MLFLOW_HINT)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--workers", "1"]
    if artifacts is not None:
        artifacts.mkdir(parents=True, exist_ok=True)
        cmd += ["--default-artifact-root", artifacts.as_uri()]
    url = f"http://{args.host}:{args.port}"
    if _answers(url):
        raise JobError(Path(args.job or "."), f"something already answers at {url}", "pick another --port")
    proc = processes.start(cmd, None, stdout=sys.stderr)  # our standard output: the URL only
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(url):
            if proc.poll() is not None:
                raise JobError(Path(args.job or "."), f"mlflow server exited with code {proc.returncode} before it "
                               f"answered at {url}", "see its messages above; is the port free?")
            if time.monotonic() > deadline:
                raise JobError(Path(args.job or "."), f"mlflow server did not answer at {url} within "
                               f"{START_TIMEOUT_S:g} s", "see its messages above")
            time.sleep(0.5)
        print(f"autocnnp dashboard: {url} (store {uri}); Ctrl-C stops it", flush=True)
        try:
            proc.wait()
        except Interrupted as exc:  # the way to stop it
            print(f"autocnnp dashboard: stopped ({exc})", flush=True)
            return 0
        return 0 if proc.returncode == 0 else 1
    finally:
        processes.stop_session(proc, 5.0)


def cmd_track_sync(args) -> int:
    rundir = RunDir(Path(args.rundir).expanduser().resolve())
    if not rundir.tracking.is_dir():
        raise JobError(rundir.root, "this run folder has no tracking journal (its job had no mlflow tracker)",
                       "name the output folder of a run whose <monitoring> tracker includes mlflow")
    sender = Sender(rundir.root, args.tracking_uri or "")
    if not is_held(rundir) and close_journal(rundir.root, "killed", last_word=True):  # its ranks and run & manage were killed
        print(f"autocnnp: the run in {rundir.root} ended without closing its MLflow run: closing it as KILLED",
              file=sys.stderr)
    try:
        sent = sender.send()
    except Exception as exc:  # noqa: BLE001 - the store does not answer or refuses
        raise JobError(rundir.root, f"the MLflow store {sender.uri} cannot take the events "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
                       "start it, or pass --tracking-uri") from None
    print(f"sent {sent} event(s) of {rundir.root} to {sender.uri} (MLflow run {sender.state.get('run_id')})")
    return 0


def add_commands(sub) -> None:
    doc = "the MLflow web UI on the project's tracking store: runs, metrics, per-rank system metrics, live"
    s = sub.add_parser("dashboard", help=doc, description=doc)
    s.add_argument("job", nargs="?", help="a job file: its mlflow tracker's store, or the store beside its runs")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="the job variant")
    s.add_argument("--store", help="a store folder (holding mlflow.db and artifacts/)")
    s.add_argument("--tracking-uri", help="a tracking URI (sqlite:///..., postgresql://...)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    s.set_defaults(func=cmd_dashboard)

    s = sub.add_parser("track", help="tracking: `track sync RUN_DIR` sends what a tracker could not send")
    verbs = s.add_subparsers(dest="verb", required=True)
    v = verbs.add_parser("sync", help="send a run's journal to its MLflow store (after the server was down)")
    v.add_argument("rundir", help="the run's output folder")
    v.add_argument("--tracking-uri", help="send to this store instead of the recorded one")
    v.set_defaults(func=cmd_track_sync)
