"""The federation server: Flower's server with one of its strategies, admitting only listed sites whose job
agrees with the server's, keeping a checkpoint after every round (a restarted server resumes from it) and
the consensus model: the round whose model scored best on the training sites' own validation samples
(weighted by their sizes), saved where ``autocnnp predict`` and ``autocnnp zoo publish`` read a run's best.

Everything a site sends is also written to ``federation/received.jsonl`` in the server's output folder:
what the server saw, for audit (and for the test that nothing but parameters and scalars leaves a site)."""

from __future__ import annotations

import csv
import io
import json
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import flwr
import numpy as np
from flwr.common import EvaluateIns, FitIns, GetPropertiesIns, ReconnectIns, ndarrays_to_parameters
from flwr.common import parameters_to_ndarrays as arrays_of
from flwr.server.client_manager import SimpleClientManager
from flwr.server.server import run_fl
from flwr.server.strategy import FedAdam, FedAvg, FedProx, FedYogi
from flwr.server.strategy.fedopt import FedOpt
from flwr.server.superlink.fleet.grpc_bidi.grpc_server import start_grpc_server
from flwr.supercore.grpc import GRPC_MAX_MESSAGE_LENGTH

from ..core.errors import ExitCode, Interrupted
from ..core.files import append_text, atomic_write, read_json, write_json
from ..core.rundir import BEST_CHECKPOINT, BEST_RECORD, RunDir
from .admission import SignedChallenge, agreement, differences
from .certs import read_server_certificates
from .config import FederationConfig
from .logs import say
from .tracking import federation_runs, weighted_mean

STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi}
DATA_KEYS = ("in_channels", "num_classes", "classes")  # what every site's data must share


class Audit:
    """``received.jsonl``: one line per message from a site (its kind, site, scalars, array shapes)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.Lock()  # sites' threads record at once; append_text wants one writer

    def record(self, kind: str, site: str, **fields) -> None:
        with self.lock:
            append_text(self.path, json.dumps({"kind": kind, "site": site, **fields}, default=str) + "\n")


class Admission(SimpleClientManager):
    """Flower's client manager, with a door: a connecting site proves who it is (``identity``: the transport's
    site authentication, by default a challenge it signs with its listed key) and sends its job's agreement; a
    refused one is told why, disconnected, and the refusal logged. Only admitted sites are sampled; ``sample``
    waits for ``min_sites`` training sites up to ``timeout_s``, saying so."""

    def __init__(self, sites: dict, ours: dict, min_sites: int, timeout_s: float, audit: Audit, identity=None):
        super().__init__()
        self.sites, self.ours, self.min_sites, self.timeout_s, self.audit = sites, ours, min_sites, timeout_s, audit
        self.identity = identity or SignedChallenge(sites)
        self.who: dict[str, tuple[str, str]] = {}  # cid -> (site name, role)
        self.reference: dict | None = None  # the first admitted site's data description (names, card)

    def register(self, client) -> bool:
        threading.Thread(target=self._admit, args=(client,), daemon=True).start()
        return True

    def _admit(self, client) -> None:
        asked = self.identity.question()
        try:
            props = client.get_properties(GetPropertiesIns(asked), timeout=self.timeout_s, group_id=None).properties
        except Exception as exc:  # noqa: BLE001 - a client gone before it answered
            say(f"a connection closed before it identified itself ({type(exc).__name__})")
            return
        name, reason = self.identity.identify(client.cid, asked, props)
        self.audit.record("properties", name, properties=props)
        if reason is None:
            found = differences(self.ours, json.loads(str(props.get("agreement", "{}"))), f"site {name}")
            reason = f"its job differs from the server's: {'; '.join(found)}" if found else None
        if reason is None:
            reason = self._data_differs(name, props)
        if reason is None and name in {n for n, _ in self.who.values()}:
            reason = f"site {name!r} is connected already"
        if reason is not None:
            print(f"autocnnp: refused a site: {reason}", file=sys.stderr, flush=True)
            self.audit.record("refused", name, reason=reason)
            try:
                client.get_properties(GetPropertiesIns({"verdict": reason}), timeout=self.timeout_s, group_id=None)
                client.reconnect(ReconnectIns(seconds=None), timeout=self.timeout_s, group_id=None)
            except Exception:  # noqa: BLE001 - it left already
                pass
            return
        role = str(props.get("role", "train"))
        self.who[client.cid] = (name, role)
        say(f"site {name} joined ({role}); {self.training_count()} training site(s) connected")
        super().register(client)

    def end(self) -> None:
        """Tell every admitted site that the federation ended (a site whose connection outlives the rounds, as a
        SuperNode's does, then stops), all at once."""
        def tell(client) -> None:
            try:
                client.get_properties(GetPropertiesIns({"ended": "1"}), timeout=self.timeout_s, group_id=None)
            except Exception:  # noqa: BLE001 - it left already
                pass

        with ThreadPoolExecutor(max(1, len(self.clients))) as pool:
            list(pool.map(tell, list(self.clients.values())))

    def _data_differs(self, name: str, props) -> str | None:
        theirs = {"names": json.loads(str(props["names"])), "card": json.loads(str(props["card"]))}
        if self.reference is None:
            self.reference = theirs
            return None
        ref = self.reference
        found = [f"{key}: {ref['card'][key]} at the first site, {theirs['card'][key]} at site {name}"
                 for key in DATA_KEYS if ref["card"][key] != theirs["card"][key]]
        if ref["names"] != theirs["names"]:
            found.append("the network's tensors differ")
        return f"its data differs from the federation's: {'; '.join(found)}" if found else None

    def unregister(self, client) -> None:
        if client.cid in self.clients:
            name, _ = self.who.pop(client.cid, ("?", ""))
            say(f"site {name} left; {self.training_count()} training site(s) connected")
        super().unregister(client)

    def site(self, cid: str) -> str:
        return self.who.get(cid, ("?", ""))[0]

    def training(self) -> list:
        return [c for cid, c in self.clients.items() if self.who.get(cid, ("", ""))[1] == "train"]

    def training_count(self) -> int:
        return sum(role == "train" for _, role in self.who.values())

    def sample(self, num_clients: int, min_num_clients=None, criterion=None) -> list:
        """Every admitted training site, once at least ``min_sites`` are there (waiting up to the timeout)."""
        deadline = time.monotonic() + self.timeout_s
        if self.training_count() < self.min_sites:
            say(f"waiting for {self.min_sites} training site(s), {self.training_count()} connected "
                f"(up to {self.timeout_s:g} s)")
        with self._cv:
            while self.training_count() < self.min_sites:
                if not self._cv.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic()))) \
                        and time.monotonic() >= deadline:
                    raise TooFewSites(f"fewer than min_sites={self.min_sites} training sites joined within "
                                       f"{self.timeout_s:g} s ({self.training_count()} did)")
        return self.training()


class TooFewSites(Exception):
    """Fewer than ``min_sites`` training sites joined within the round timeout."""


class Rounds:
    """The federation's state on disk (``federation/``): the latest round's model, the per-site metrics
    of every round, and the consensus model selected so far; and in MLflow (tracking.py)."""

    def __init__(self, rundir: RunDir, job, fed: FederationConfig, admission: Admission):
        self.rundir, self.job, self.fed, self.admission = rundir, job, fed, admission
        self.folder = rundir.root / "federation"
        self.state = read_json(self.folder / "state.json") or {"round": 0, "best": None}
        self.evaluated = None  # the parameters the current evaluation round scores
        self.tracking = federation_runs(job, fed.rounds, self.state["round"])  # MLflow: a parent run, a child per site

    def latest(self):
        path = self.folder / "latest.npz"
        if not path.is_file():
            return None
        with np.load(path) as saved:
            return ndarrays_to_parameters([saved[f"a{i}"] for i in range(len(saved.files))])

    def save_moments(self, first: list[np.ndarray], second: list[np.ndarray]) -> None:
        """FedAdam's and FedYogi's server optimizer state (first and second moments), kept with the round's model
        so that a restarted server steps on from them."""
        arrays = {**{f"m{i}": a for i, a in enumerate(first)}, **{f"v{i}": a for i, a in enumerate(second)}}
        atomic_write(self.folder / "moments.npz", lambda f: np.savez(f, **arrays))

    def moments(self) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
        path = self.folder / "moments.npz"
        if not path.is_file():
            return None
        with np.load(path) as saved:
            count = len(saved.files) // 2
            return [saved[f"m{i}"] for i in range(count)], [saved[f"v{i}"] for i in range(count)]

    def save_round(self, done: int, parameters) -> None:
        if parameters is not None:
            arrays = arrays_of(parameters)
            atomic_write(self.folder / "latest.npz", lambda f: np.savez(f, **{f"a{i}": a for i, a in enumerate(arrays)}))
        self.state["round"] = done
        write_json(self.folder / "state.json", self.state)

    def log_metrics(self, done: int, rows: list[tuple[str, str, int, dict]]) -> None:
        path = self.folder / "metrics.csv"
        text = io.StringIO()
        out = csv.writer(text)
        if not path.exists():
            out.writerow(["round", "site", "role", "samples", "metric", "value"])
        for site, role, samples, metrics in rows:
            out.writerows([done, site, role, samples, k, f"{v:.6g}"] for k, v in sorted(metrics.items()))
        append_text(path, text.getvalue())
        if self.tracking:
            self.tracking.round(done, rows)

    def consider(self, done: int, score: float) -> None:
        """Keep round ``done``'s model as the consensus if it scores best so far."""
        best = self.state.get("best")
        if best is not None and score <= best["value"]:
            return
        self.state["best"] = {"metric": self.fed.select_metric, "value": score, "epoch": done}
        self.save_checkpoint(done, self.evaluated)
        write_json(self.rundir.checkpoints / BEST_RECORD, self.state["best"])
        write_json(self.folder / "state.json", self.state)
        if self.tracking:
            self.tracking.selected(done, self.fed.select_metric, score)
        say(f"consensus model: round {done} ({self.fed.select_metric} {score:.4f}), saved to "
            f"{self.rundir.checkpoints / BEST_CHECKPOINT}")

    def save_checkpoint(self, done: int, parameters) -> None:
        """A checkpoint ``autocnnp predict`` reads: the tensors by name and the model card (loop.py's
        ``model_card``: the server's :func:`job_card`, the sites' channels, classes and input)."""
        import torch

        from ..training.loop import job_card

        ref = self.admission.reference
        names, card = ref["names"], ref["card"]
        full = {**job_card(self.job.generator), **card}
        model = OrderedDict((n, torch.as_tensor(a)) for n, a in zip(names, arrays_of(parameters), strict=True))
        state = {"model": model, "model_card": full, "epoch": done, "in_channels": card["in_channels"],
                 "num_classes": card["num_classes"], "federation_round": done}
        self.rundir.checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write(self.rundir.checkpoints / BEST_CHECKPOINT, lambda f: torch.save(state, f))


def federated_strategy(fed: FederationConfig, rounds: Rounds, admission: Admission, audit: Audit, initial):
    """Flower's strategy named by ``aggregation``, with the federation's rounds around it."""
    base = STRATEGIES[fed.aggregation]

    class Federated(base):
        def initialize_parameters(self, client_manager):
            return initial  # None: Flower asks one site for the job's initial model

        def configure_fit(self, server_round, parameters, client_manager):
            if isinstance(self, FedOpt) and not self.current_weights:
                self.current_weights = arrays_of(parameters)
            done = rounds.state["round"] + 1
            config = {"round": done, "local_epochs": fed.local_epochs,
                      "proximal_mu": fed.proximal_mu if fed.aggregation == "fedprox" else 0.0}
            sites = client_manager.sample(fed.min_sites)
            say(f"round {done} of {fed.rounds}: {len(sites)} site(s) train {fed.local_epochs} epoch(s)")
            self.round_started = time.perf_counter()
            return [(c, FitIns(parameters, config)) for c in sites]

        def aggregate_fit(self, server_round, results, failures):
            done = rounds.state["round"] + 1
            for client, res in results:
                audit.record("fit", admission.site(client.cid), samples=res.num_examples, metrics=res.metrics,
                             arrays=[[list(a.shape), str(a.dtype)] for a in arrays_of(res.parameters)])
            if failures:
                say(f"round {done}: {len(failures)} site(s) dropped out, {len(results)} result(s)")
            if len(results) < fed.min_sites:
                say(f"round {done}: {len(results)} result(s), fewer than min_sites={fed.min_sites}: the model "
                    "stays as it was")
                rounds.save_round(done, self.evaluated_or_latest())
                return None, {}
            parameters, metrics = super().aggregate_fit(server_round, results, failures)
            if isinstance(self, FedOpt):
                rounds.save_moments(self.m_t, self.v_t)
            rounds.save_round(done, parameters)
            slowest = max(float(res.metrics.get("fit_s", 0.0)) for _, res in results)
            say(f"round {done}: aggregated {len(results)} site(s) ({fed.aggregation}) in "
                f"{time.perf_counter() - self.round_started:.1f} s (slowest local training {slowest:.1f} s)")
            return parameters, metrics

        def evaluated_or_latest(self):
            return rounds.evaluated if rounds.evaluated is not None else rounds.latest()

        def configure_evaluate(self, server_round, parameters, client_manager):
            rounds.evaluated = parameters
            return [(c, EvaluateIns(parameters, {"round": rounds.state["round"]}))
                    for c in client_manager.all().values()]

        def aggregate_evaluate(self, server_round, results, failures):
            done = rounds.state["round"]
            rows = []
            for client, res in results:
                name = admission.site(client.cid)
                role = admission.who.get(client.cid, ("", "train"))[1]
                audit.record("evaluate", name, samples=res.num_examples, loss=res.loss, metrics=res.metrics)
                rows.append((name, role, res.num_examples, dict(res.metrics)))
                shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(res.metrics.items()) if k.startswith("dice"))
                say(f"round {done}: site {name} ({role}) validation: {shown}")
            rounds.log_metrics(done, rows)
            weighted = [(n, m[fed.select_metric]) for _, role, n, m in rows
                        if role == "train" and fed.select_metric in m]
            if weighted:
                score = sum(n * v for n, v in weighted) / max(1, sum(n for n, _ in weighted))
                say(f"round {done}: weighted {fed.select_metric} over the training sites {score:.4f}")
                rounds.consider(done, score)
            losses = [(res.num_examples, res.loss) for _, res in results]
            total = sum(n for n, _ in losses)
            return (sum(n * v for n, v in losses) / total if total else None), {}

    options = {"fit_metrics_aggregation_fn": weighted_mean, "evaluate_metrics_aggregation_fn": weighted_mean,
               "fraction_fit": 1.0, "fraction_evaluate": 1.0, "min_fit_clients": fed.min_sites,
               "min_evaluate_clients": 1, "min_available_clients": fed.min_sites, "initial_parameters": initial}
    if fed.aggregation == "fedprox":
        options["proximal_mu"] = fed.proximal_mu
    if fed.aggregation in ("fedadam", "fedyogi"):
        options.update(eta=fed.server_lr, initial_parameters=initial or ndarrays_to_parameters([]))
    strategy = Federated(**options)
    moments = rounds.moments() if initial is not None else None
    if isinstance(strategy, FedOpt) and moments is not None:  # a restarted server steps on from its moments
        strategy.current_weights = arrays_of(initial)
        strategy.m_t, strategy.v_t = moments
    return strategy


def serve_grpc(setup, fed: FederationConfig, sites: dict, certs, listen: str | None, audit: Audit) -> None:
    """The grpc transport: Flower's server in this process on ``listen`` (default: every address, the
    <federation> server's port), sites admitted by the challenge they sign (``flwr.server.start_server`` without
    its signal handlers: a signal here is the command's, which stops the gRPC server on the way out)."""
    certificates = read_server_certificates(certs)
    admission, server, config = setup(SignedChallenge(sites))
    address = listen or f"0.0.0.0:{fed.server.rpartition(':')[2]}"
    say(f"federation server on {address} ({'TLS' if certificates else 'no TLS'}), {len(sites)} site(s) "
        f"listed, {config.num_rounds} round(s) to go, {fed.aggregation}")
    grpc_server = start_grpc_server(client_manager=admission, server_address=address,
                                    max_message_length=GRPC_MAX_MESSAGE_LENGTH, certificates=certificates)
    try:
        run_fl(server, config)
    finally:
        grpc_server.stop(grace=1).wait()


def server_job(job_file: Path, sets: list[str]):
    """The server's job: the sites' job, whose data paths the server never reads (they need not exist here)."""
    from ..generator.overrides import parse_sets, read_variant
    from ..run.job import load_job

    spec = read_variant(job_file, parse_sets(sets))
    here = [f"data.{part}={spec.base_dir}" for part in spec.data_paths]
    return load_job(job_file, [*sets, *here])


def run_server(job, fed: FederationConfig, site_list: Path, certs: tuple[Path, Path, Path] | None,
               listen: str | None = None, serve=serve_grpc) -> int:
    """Serve the federation's rounds to the listed sites with ``serve`` (the job's transport: transports.py);
    returns the exit code."""
    from ..run import lock
    from .admission import read_site_list

    sites = read_site_list(site_list)
    rundir = job.rundir
    with lock.own_output(job, front_end=False):
        folder = rundir.root / "federation"
        audit = Audit(folder / "received.jsonl")
        done = (read_json(folder / "state.json") or {"round": 0})["round"]
        if done >= fed.rounds:
            say(f"the federation in {rundir} has run its {fed.rounds} round(s) already: raise rounds to go on")
            return 0

        made: list[Rounds] = []

        def setup(identity):
            """The rounds to go, sites admitted by ``identity``: (admission, Flower's server, its config)."""
            admission = Admission(sites, agreement(job), fed.min_sites, fed.round_timeout_s, audit, identity)
            rounds = Rounds(rundir, job, fed, admission)
            made.append(rounds)
            initial = rounds.latest() if done else None
            if done:
                say(f"resuming the federation from round {done} ({folder / 'latest.npz'})")
            server = flwr.server.Server(client_manager=admission,
                                        strategy=federated_strategy(fed, rounds, admission, audit, initial))
            return admission, server, flwr.server.ServerConfig(num_rounds=fed.rounds - done,
                                                               round_timeout=fed.round_timeout_s)

        try:
            serve(setup, fed, sites, certs, listen, audit)
        except BaseException as exc:  # its MLflow runs end with it (a restart resumes them)
            for rounds in made:
                if rounds.tracking:
                    rounds.tracking.end("terminated" if isinstance(exc, Interrupted) else "failed")
            if not isinstance(exc, TooFewSites):
                raise
            say(f"{exc}: the federation stops, its rounds so far are kept; start it again once the sites can "
                f"join (or lower min_sites, raise round_timeout_s)")
            return ExitCode.FAILED
        best = (read_json(folder / "state.json") or {}).get("best")
        if best:
            say(f"done: consensus model of round {best['epoch']} ({best['metric']} {best['value']:.4f}) in "
                f"{rundir.checkpoints / BEST_CHECKPOINT}")
    return 0
