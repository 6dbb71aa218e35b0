"""A site: the job's own training run (local.py: in this process, or on the job's ranks), driven round by
round by the federation server through Flower. What leaves the site: the
network's parameters, the number of training and validation samples, scalar metrics, and at admission the
job's :func:`~autocnnp.federation.admission.agreement`, the parameter names and the classes' and
channels' names (what a checkpoint's model card needs). Never a path, a case name, an image or a label."""

from __future__ import annotations

import json
import socket
import ssl
import sys
import time
from pathlib import Path

import flwr
import grpc

from ..core.errors import Source
from ..run import lock
from ..run.job import Job
from .admission import Unreachable, agreement, load_private_key, refused, sign
from .certs import CaCertificate, read_ca
from .config import FederationConfig
from .local import SiteTrainer, site_trainer

ROLES = ("train", "evaluate")
JOIN_WAIT_S = 30.0  # how long a joining site waits for a server that does not listen yet


class SiteClient(flwr.client.NumPyClient):
    """The Flower client of a site: answers the server's challenge, trains, scores."""

    def __init__(self, trainer: SiteTrainer, name: str, key, role: str):
        self.trainer, self.name, self.key, self.role = trainer, name, key, role
        self.verdict: str | None = None  # why the server refused this site, if it did
        self.contacted = False  # whether the server asked anything on this connection
        self.ended = False  # whether the server said the federation ended

    def get_properties(self, config):
        self.contacted = True
        if "verdict" in config:
            self.verdict = str(config["verdict"])
            print(f"autocnnp: the server refused this site: {self.verdict}", file=sys.stderr, flush=True)
            return {}
        if "ended" in config:
            self.ended = True
            return {}
        proof = {"signature": sign(self.key, str(config["challenge"]))} if "challenge" in config else {}
        return {"site": self.name, "role": self.role, **proof, "agreement": json.dumps(agreement(self.trainer.job)),
                "names": json.dumps(self.trainer.names()), "card": json.dumps(self.trainer.card())}

    def get_parameters(self, config):
        self.contacted = True
        return self.trainer.parameters()

    def fit(self, parameters, config):
        self.contacted = True
        start = time.perf_counter()
        metrics = self.trainer.train(parameters, int(config["local_epochs"]), float(config.get("proximal_mu", 0.0)))
        metrics["fit_s"] = time.perf_counter() - start
        print(f"autocnnp: site {self.name}: round {config['round']} trained, "
              + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("dice")), flush=True)
        return self.trainer.parameters(), len(self.trainer.run.data.train), metrics

    def evaluate(self, parameters, config):
        metrics = self.trainer.evaluate(parameters)
        return metrics.get("valid_loss", 0.0), len(self.trainer.run.data.valid), metrics


def join_grpc(client: SiteClient, address: str, ca: CaCertificate | None, key_file: Path, timeout_s: float,
              folder: Path) -> None:
    """The grpc transport: Flower's client in this process (:func:`_take_part`)."""
    _take_part(client, address, None if ca is None else ca.pem, timeout_s)


def run_site(job: Job, federation: FederationConfig, name: str, key_file: Path, ca_file: Path | None,
             role: str = "train", server: str | None = None, join=join_grpc) -> int:
    """Join the federation as ``name`` with ``join`` (the job's transport: transports.py) and take part until
    the server ends it; raises JobError if refused."""
    key = load_private_key(key_file)
    ca = None if ca_file is None else read_ca(ca_file)  # read once: the probe and the transport use what was read
    address = server or federation.server
    with lock.own_output(job, front_end=False):
        trainer = site_trainer(job)  # the site's own data check, first
        probe(address, None if ca is None else ca.pem, min(federation.round_timeout_s, JOIN_WAIT_S))
        join(SiteClient(trainer, name, key, role), address, ca, Path(key_file), federation.round_timeout_s,
             job.rundir.root / "federation")
    print(f"autocnnp: site {name}: the federation ended", flush=True)
    return 0


def probe(address: str, root: bytes | None, wait_s: float) -> None:
    """Raise Unreachable within seconds if nothing listens at ``address`` (for ``wait_s``), its host does not
    resolve, or, with TLS, its certificate is foreign to ``root`` or expired: before Flower's client, which
    would retry for ``round_timeout_s``."""
    host, _, port = address.rpartition(":")
    where = Source(Path("."), text=f"federation server {address}")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            conn = socket.create_connection((host.strip("[]"), int(port)), timeout=5.0)
            break
        except socket.gaierror as exc:
            raise Unreachable(where, f"its host {host!r} does not resolve ({exc.strerror})",
                              "check the <federation> server address (or --server)") from None
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise Unreachable(where, f"nothing answers there within {wait_s:g} s ({exc.strerror or exc})",
                                  "check the <federation> server address (or --server), that the server runs and "
                                  "that its port is open") from None
            time.sleep(0.5)
    with conn:
        if root is None:
            return
        context = ssl.create_default_context(cadata=root.decode())
        context.set_alpn_protocols(["h2"])
        try:
            context.wrap_socket(conn, server_hostname=host.strip("[]")).close()
        except ssl.SSLCertVerificationError as exc:
            why = ("its certificate has expired" if "expired" in exc.verify_message else
                   f"its certificate is not one --ca vouches for ({exc.verify_message})")
            raise Unreachable(where, why, "ask the federation's operator for its current ca.crt, or to renew the "
                              "server's certificate") from None
        except (ssl.SSLError, OSError) as exc:
            raise Unreachable(where, f"no TLS handshake ({exc})", "check that the server runs with --certs, "
                              "and the address") from None


def _take_part(client: SiteClient, address: str, root: bytes | None, timeout_s: float) -> None:
    """Flower's client until the server ends the federation; reconnects to a server gone for up to
    ``timeout_s``."""
    name, role = client.name, client.role
    print(f"autocnnp: site {name} ({role}) joins the federation at {address}", flush=True)
    lost_at = None  # when the server was last heard of, while it is away
    while True:
        client.contacted = False
        try:
            flwr.client.start_client(server_address=address, client=client.to_client(), root_certificates=root,
                                     insecure=root is None, transport="grpc-bidi")
            break
        except grpc.RpcError as exc:
            why = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.Call) else type(exc).__name__
            if client.contacted or lost_at is None:
                what = "lost the server" if client.contacted else "cannot reach the server yet"
                print(f"autocnnp: site {name}: {what} ({why}); trying again for up to {timeout_s:g} s",
                      file=sys.stderr, flush=True)
                lost_at = time.monotonic()
            elif time.monotonic() - lost_at > timeout_s:
                raise Unreachable(Source(Path("."), text=f"federation server {address}"),
                                  f"cannot reach it within {timeout_s:g} s ({why})",
                                  "check the <federation> server address (or --server), that the server runs and "
                                  "that its port is open; with TLS, that --ca is the CA that signed its "
                                  "certificate") from None
            time.sleep(1.0)
    refused(client, address)


def site_job(job_file: Path, sets: list[str], data: Path | None, out: Path | None) -> Job:
    """The site's job: its own data (``data.train``) and output folder (its ranks: local.py's ``site_trainer``)."""
    from ..run.job import load_job

    extra = [f"data.train={Path(data).resolve()}"] if data else []
    extra += [f"output={Path(out).resolve()}"] if out else []
    return load_job(job_file, [*sets, *extra])
