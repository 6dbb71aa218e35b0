"""The federation in MLflow, as the study tracked it, where the job has the mlflow tracker (its store,
``tracking_uri``, and experiment, by default the job file's name): one parent run for the federation (the
server's output folder's run: the plan as params, the consensus's validation metrics weighted over the
training sites per round as ``consensus/METRIC``, the selected round) and a child run per site (tags ``site``
and ``role``: training or out-of-sample) with its local validation metrics per round (step = round).

Events go through the mlflow tracker's journals (``OUTPUT/tracking/`` for the parent,
``OUTPUT/federation/sites/NAME/tracking/`` for a site's child) and are sent after every round. A store that
does not answer stops nothing: it is said once and the journals keep the events for ``autocnnp track sync`` (of
``OUTPUT`` and of each ``OUTPUT/federation/sites/NAME``).
A server that stops before the last round ends them (KILLED when stopped by a signal, FAILED when too few
sites came); a restarted server goes on with the same runs (the parent's id is in ``OUTPUT/tracking/mlflow.json``)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ..components.trackers.mlflow_tracking import JOURNAL, Journal, Sender, start_event, store_of
from ..core.rundir import RunDir
from ..run import manifest

SITES = Path("federation", "sites")  # a site's child run's folder, in the server's output folder
ROLES = {"train": "training", "evaluate": "out-of-sample"}


def weighted_mean(results: list[tuple[int, dict]]) -> dict[str, float]:
    """Each metric's mean over the sites that report it, weighted by their samples."""
    totals: dict[str, list[float]] = {}
    for samples, metrics in results:
        for key, value in metrics.items():
            total = totals.setdefault(key, [0.0, 0.0])
            total[0], total[1] = total[0] + samples * float(value), total[1] + samples
    return {key: value / weight for key, (value, weight) in totals.items() if weight}


def federation_runs(job, rounds: int, done: int) -> FederationRuns | None:
    """The federation's MLflow runs, started (or resumed after ``done`` rounds), when the job has the mlflow
    tracker and rounds are left to run."""
    config = None if job is None else job.tracker("mlflow")
    if config is None or done >= rounds:
        return None
    return FederationRuns(job, config.tracking_uri, config.experiment, rounds)


class FederationRuns:
    """The parent run and the sites' children, fed round by round."""

    def __init__(self, job, tracking_uri: str, experiment: str, rounds: int):
        self.root, self.rounds = job.rundir.root, rounds
        self.uri, _ = store_of(self.root, tracking_uri)
        self.experiment = experiment or job.spec.file.stem
        self.senders: dict[Path, Sender] = {}
        self.journals: dict[str, Journal] = {}
        self.warned = False
        info = manifest.run_info(job, "federation")
        info.tags["role"] = "federation"
        self.parent = self._open(self.root, start_event(info))
        self.send()

    def _open(self, folder: Path, start: dict) -> Journal:
        """The journal of ``folder``'s run, started unless it is going on (a restarted server's)."""
        journal = Journal(RunDir(folder).tracking / JOURNAL)
        if not journal.is_open():
            journal.add("start", **start)
        sender = Sender(folder, self.uri, self.experiment)
        sender.save()  # the store it goes to, for `autocnnp track sync` should this one never answer
        self.senders[folder] = sender
        return journal

    def site(self, name: str, role: str) -> Journal:
        """The journal of site ``name``'s child run."""
        if name not in self.journals:
            start = {"name": self.experiment, "run_name": name, "params": {}, "artifacts": {},
                     "tags": {"site": name, "role": ROLES.get(role, role)}, "parent": str(self.root)}
            folder = self.root / SITES / re.sub(r"[^\w.-]", "_", name)
            self.journals[name] = self._open(folder, start)
        return self.journals[name]

    def round(self, done: int, rows: list[tuple[str, str, int, dict]]) -> None:
        """Round ``done``'s validation: each site's metrics on its child, the training sites' weighted mean
        (``consensus/METRIC``) on the parent; after the last round every run ends."""
        for site, role, samples, metrics in rows:
            self.site(site, role).add("epoch", step=done, values={**metrics, "valid_samples": samples})
        training = [(samples, metrics) for _, role, samples, metrics in rows if role == "train"]
        self.parent.add("epoch", step=done,
                        values={f"consensus/{k}": v for k, v in weighted_mean(training).items()})
        if done >= self.rounds:
            self.end("completed")
        else:
            self.send()

    def end(self, status: str) -> None:
        """End every run still going with ``status`` (the server stopped by a signal: ``terminated``, KILLED in
        MLflow; a restarted server sets them RUNNING again), a site's not seen since a restart too, and send them."""
        sites = sorted(path.parents[1] for path in (self.root / SITES).glob(f"*/tracking/{JOURNAL}"))
        for folder in (self.root, *sites):
            journal = Journal(RunDir(folder).tracking / JOURNAL)
            if journal.is_open():
                journal.add("end", status=status)
                if folder not in self.senders:  # a site not seen since a restart
                    self.senders[folder] = Sender(folder, self.uri, self.experiment)
        self.send(again=True)

    def selected(self, done: int, metric: str, value: float) -> None:
        """Round ``done``'s model is the consensus model so far."""
        self.parent.add("tags", values={"selected_round": done, "selected_metric": metric,
                                        "selected_value": f"{value:.6g}"})
        self.send()

    def send(self, again: bool = False) -> None:
        """Send the journals (the parent's first: the children name it). A store that did not answer is said once
        and tried ``again`` only at the end (a store that is down would hold up every round)."""
        if self.warned and not again:
            return
        try:
            for sender in self.senders.values():
                sender.send()
        except Exception as exc:  # noqa: BLE001 - the store is down, refuses, or mlflow is missing
            if not self.warned:
                self.warned = True
                print(f"autocnnp: note: the MLflow store {self.uri} cannot be reached ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); the federation goes on, its events "
                      f"are kept in {self.root} and `autocnnp track sync` sends them (of the folder and of each "
                      "federation/sites/NAME)", file=sys.stderr, flush=True)
