"""The ``deployment`` transport: Flower's Deployment Engine. The server runs Flower's SuperLink, a site Flower's
SuperNode, each as a child process in the command's process group (:class:`FlowerProcess`; stopped when the
command ends, however it ends), both with ``--isolation process``: the command that started them runs the
federation's ServerApp or ClientApp itself, in its own process (:func:`run_server_app`, :func:`serve_client_app`),
as Flower's ``flwr-serverapp``/``flwr-clientapp`` would, so a site builds its training run once and keeps it
across rounds. Sites authenticate with Flower's node authentication: the server registers each listed site's
public key with the SuperLink under the site's name (:func:`register_sites`); the SuperLink refuses a SuperNode
whose key is not registered. Flower's apps poll for their tasks every 3 s: each message exchange (a round's
training, its validation) costs up to that much."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from ..core.errors import JobError, Source
from ..core.files import atomic_write
from ..core.processes import die_with_parent
from ..core.world import free_port
from .admission import FlowerNodes, Refused, Unreachable, load_private_key, refused
from .certs import CaCertificate, read_server_certificates
from .logs import say

APP_NAME = "autocnnp-federation"
AUTH_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})
POLL_S = 0.2  # how often an app asks its SuperLink or SuperNode for a task
PYPROJECT = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "autocnnp"

[tool.flwr.app.components]  # run by the autocnnp commands themselves (--isolation process), never loaded
serverapp = "autocnnp.federation.deployment:server_app"
clientapp = "autocnnp.federation.deployment:client_app"
"""


def flower_command(name: str) -> str:
    """The path of Flower's command ``name`` installed beside this Python."""
    return str(Path(sys.executable).parent / name)


class FlowerProcess:
    """A Flower command in this command's process group (a signal to the group reaches it too; it dies with this
    process, even one killed), its output in ``log``; each output line is also passed to ``on_line``. ``stop``
    ends it (SIGTERM, then SIGKILL after ``grace_s``)."""

    def __init__(self, args: list[str], log: Path, on_line: Callable[[str], None] | None = None,
                 env: dict | None = None):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})},
                                     preexec_fn=lambda: die_with_parent(signal.SIGTERM))
        self.thread = threading.Thread(target=self._copy, args=(on_line,), daemon=True)
        self.thread.start()

    def _copy(self, on_line) -> None:
        with self.log.open("a") as out:
            for line in self.proc.stdout:
                out.write(line)
                out.flush()
                if on_line is not None:
                    on_line(line.rstrip("\n"))

    def running(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, grace_s: float = 5.0) -> None:
        """End the process; Flower's threads in this command that still talk to it (heartbeats, the server's node
        updates) then fail on their way out, unsaid."""
        threading.excepthook = lambda args: None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(grace_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc.wait()
        self.thread.join(5.0)


def wait_listening(host: str, port: int, process: FlowerProcess, timeout_s: float) -> bool:
    """Whether ``process`` listens on ``host:port`` within ``timeout_s`` (False once it ended)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.running():
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return True
        except OSError:
            time.sleep(0.2)
    return False


def write_secret(path: Path) -> bytes:
    """A random secret for SuperExec authentication (only the holder of it may take the SuperLink's tasks)."""
    secret = secrets.token_hex(32).encode()
    atomic_write(path, secret)
    path.chmod(0o600)
    return secret


def retries(max_time_s: float):
    """Retry a Runtime API call on transport errors for up to ``max_time_s`` (Flower's own retry invoker sends
    this process SIGINT on an HTTP 401, and retries forever)."""
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential

    return RetryInvoker(lambda: exponential(max_delay=2.0), httpx.TransportError, max_tries=None,
                        max_time=max_time_s)


def _runtime_client(address: str, root: bytes | None, interceptors: list, max_time_s: float = 30.0):
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(server_address=address, insecure=root is None,
                                                 root_certificates=root, interceptors=interceptors,
                                                 retry_invoker=retries(max_time_s))


def acquire_task(client, task_type, stop: Callable[[], bool]) -> str | None:
    """Wait for a task of ``task_type``; returns its token (None once ``stop()``)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    while not stop():
        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[task_type]))
        if res.HasField("task") and res.token:
            return res.token
        time.sleep(POLL_S)
    return None


def control_client(address: str, ca: Path | None):
    """A client of the SuperLink's Control API at ``address``."""
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    connection = SuperLinkConnection(name="autocnnp", address=address,
                                     root_certificates=None if ca is None else str(Path(ca).resolve()),
                                     insecure=ca is None)
    with contextlib.redirect_stdout(io.StringIO()):  # Flower's CLI line "Using SuperLink: ..."
        return init_http_client_from_connection(connection)


def register_sites(client, sites: dict) -> list[str]:
    """Register each site's public key (``{name: key}``) with the SuperLink under its name; returns the names
    registered now (a restarted server finds the others registered already, in its database)."""
    from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    known = {bytes(node.public_key) for node in client.ListNodes(ListNodesRequest()).nodes_info}
    added = []
    for name, key in sites.items():
        data = public_key_to_bytes(key)
        if data not in known:
            client.RegisterNode(RegisterNodeRequest(public_key=data, name=name))
            added.append(name)
    return added


def submit_run(client, folder: Path) -> int:
    """Submit the federation's Flower app (a FAB built from ``folder``) as a run; returns its id."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "pyproject.toml", PYPROJECT)
    fab = build_fab_from_disk(folder.resolve())
    res = client.StartRun(StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
                                          override_config=user_config_to_proto({}), federation="",
                                          app_spec=""))
    return res.run_id


def run_server_app(address: str, root: bytes | None, secret: bytes, main: Callable) -> None:
    """Take the SuperLink's ServerApp task and run ``main(grid, context)`` for it in this process."""
    from flwr.app import RecordDict
    from flwr.common.constant import SubStatus
    from flwr.common.serde import context_from_proto, context_to_proto, run_from_proto
    from flwr.proto.runtime_pb2 import PullTaskInputRequest, PushTaskOutputRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor
    from flwr.superlink.grid import HttpGrid

    auth = SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=AUTH_METHODS)
    acquirer = _runtime_client(address, root, [auth])
    try:
        token = acquire_task(acquirer, TaskType.SERVER_APP, lambda: False)
    finally:
        acquirer.close()
    grid = HttpGrid(runtime_api_address=address, insecure=root is None, root_certificates=root, token=token)
    grid._retry_invoker = retries(60.0)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(grid._runtime_client))
    heartbeat.start()
    status, details, context = SubStatus.FAILED, "autocnnp's ServerApp failed", None
    try:
        res = grid._runtime_client.PullTaskInput(PullTaskInputRequest())
        context, run = context_from_proto(res.context), run_from_proto(res.run)
        grid.set_run(run)
        main(grid, context)
        status, details = SubStatus.COMPLETED, ""
        context.state = RecordDict()
    finally:
        grid._retry_invoker.max_tries = 1  # as Flower's own: on the way out, do not wait for a SuperLink gone
        with contextlib.suppress(Exception):  # best effort: the SuperLink may have stopped with this command
            grid._runtime_client.PushTaskOutput(PushTaskOutputRequest(
                context=context_to_proto(context) if context else None, sub_status=status, details=details))
        with contextlib.suppress(Exception):
            heartbeat.stop()
            grid.close()


def serve_client_app(address: str, app, done: Callable[[], bool]) -> None:
    """Take the SuperNode's ClientApp tasks one after the other and run ``app`` for each in this process, until
    ``done()`` (checked between tasks, and every few seconds while the SuperNode does not answer)."""
    import httpx
    from flwr.common.constant import SubStatus
    from flwr.supercore.constant import TaskType
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    acquirer = _runtime_client(address, None, [], max_time_s=3.0)
    try:
        while not done():
            try:
                token = acquire_task(acquirer, TaskType.CLIENT_APP, done)
            except httpx.HTTPError:
                continue  # the SuperNode away: done() says whether it ended
            if token is None:
                return
            client = _runtime_client(address, None, [RuntimeTokenHttpInterceptor(token)])
            heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
            heartbeat.start()
            try:
                message, context, _, _ = pull_task_input(client)
                reply = app(message=message, context=context)
                push_message(client, reply, context)
                push_task_output(client=client, context=context, sub_status=SubStatus.COMPLETED, details="")
            finally:
                heartbeat.stop()
                client.close()
    finally:
        acquirer.close()



def refusal_logger(audit):
    """A SuperLink output line handler: a SuperNode whose key is not registered, refused by Flower's node
    authentication, is said on the console and recorded in the audit log (with its key's fingerprint)."""

    def on_line(line: str) -> None:
        if "ApiError:2004" not in line:
            return
        key = line.partition("public key: ")[2].partition(", exception")[0]
        reason = (f"a SuperNode whose key is not registered (Flower's node authentication; key "
                  f"{hashlib.sha256(key.encode()).hexdigest()[:16]})")
        print(f"autocnnp: refused a site: {reason}", file=sys.stderr, flush=True)
        audit.record("refused", "?", reason=reason)
    return on_line


def serve(setup, fed, sites: dict, certs, listen: str | None, audit) -> None:
    """Flower's SuperLink on ``listen`` (default: every address, the <federation> server's port; Fleet, Control and
    Runtime API on that one port) with the listed sites' keys registered, and the rounds that ``setup(identity)``
    makes run as the SuperLink's ServerApp in this process."""
    certificates = read_server_certificates(certs)  # the SuperLink reads the files, the ServerApp trusts the CA
    folder = audit.path.parent
    host, _, port = fed.server.rpartition(":")
    listen_host, _, listen_port = (listen or f"0.0.0.0:{port}").rpartition(":")
    tls = (["--ssl-ca-certfile", str(certs[0]), "--ssl-certfile", str(certs[1]), "--ssl-keyfile", str(certs[2])]
           if certs else ["--insecure"])
    secret = write_secret(folder / "superexec.secret")
    link = FlowerProcess(
        [flower_command("flower-superlink"), *tls, "--enable-supernode-auth", "--database",
         str(folder / "superlink.db"), "--disable-runtime-dependency-installation", "--isolation", "process",
         "--superexec-auth-secret-file", str(folder / "superexec.secret"), "--host", listen_host,
         "--port", listen_port], folder / "superlink.log", refusal_logger(audit), env={"FLWR_HOME": str(folder / "flwr")})
    try:
        local = "127.0.0.1" if listen_host in ("0.0.0.0", "::") else listen_host
        if not wait_listening(local, int(listen_port), link, 60.0):
            raise JobError(Source(Path("."), text="flower-superlink"), "Flower's SuperLink did not start: "
                           + " ".join(link.text().splitlines()[-3:]), f"see {folder / 'superlink.log'}")
        address = f"{host}:{listen_port}"
        control = control_client(address, certs and certs[0])
        try:
            added = register_sites(control, sites)
            submit_run(control, folder / "app")
        finally:
            control.close()
        say(f"federation server (Flower SuperLink) on {listen_host}:{listen_port} ({'TLS' if certs else 'no TLS'}), "
            f"{len(sites)} site(s) registered{f' ({len(added)} new)' if added else ''}, {fed.aggregation}")

        def main(grid, context) -> None:
            from flwr.server.compat import start_grid

            admission, server, config = setup(FlowerNodes(lambda: {str(n.node_id): n.name for n in grid.get_nodes()}))
            start_grid(grid=grid, server=server, config=config)
            admission.end()

        run_server_app(address, certificates and certificates[0], secret, main)
    finally:
        link.stop()


def node_key(path: Path, converted: Path) -> Path:
    """The site's private key file as Flower's SuperNode reads it (OpenSSH format): ``path`` itself, or a copy
    converted from PEM written to ``converted``."""
    key = load_private_key(path)
    if b"OPENSSH PRIVATE KEY" in Path(path).read_bytes():
        return Path(path)
    converted.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(converted, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    converted.chmod(0o600)
    return converted


def join(client, address: str, ca: CaCertificate | None, key_file: Path, timeout_s: float, folder: Path) -> None:
    """Flower's SuperNode, authenticated by the site's key, with this process serving its ClientApp (``client``),
    until the server ends the federation; the SuperNode reconnects to a server gone for up to ``timeout_s``."""
    from flwr.clientapp import ClientApp

    name = client.name
    say(f"site {name} ({client.role}) joins the federation at {address} (Flower SuperNode)")
    port = free_port()
    tls = ["--root-certificates", str(ca.file)] if ca is not None else ["--insecure"]
    node = FlowerProcess(
        [flower_command("flower-supernode"), "--superlink", address, *tls, "--auth-supernode-private-key",
         str(node_key(key_file, folder / "node.key")), "--isolation", "process", "--host", "127.0.0.1",
         "--port", str(port), "--node-config", f"site={json.dumps(name)}", "--max-wait-time", f"{timeout_s:g}"],
        folder / "supernode.log", env={"FLWR_HOME": str(folder / "flwr")})
    try:
        if wait_listening("127.0.0.1", port, node, 60.0):
            app = ClientApp(client_fn=lambda context: client.to_client())
            serve_client_app(f"127.0.0.1:{port}", app,
                             lambda: client.verdict is not None or client.ended or not node.running())
    finally:
        node.stop()
    refused(client, address)
    where = Source(Path("."), text=f"federation server {address}")
    if not client.ended:
        if "Failed to activate SuperNode" in node.text():
            raise Refused(where, f"site {name} was refused: its key is not registered there (Flower's node "
                          "authentication)", "send the operator this site's public key (NAME.pub) to list in "
                          "sites.csv, and give --key its private half")
        raise Unreachable(where, f"lost it for {timeout_s:g} s (Flower's SuperNode ended: "
                          f"{' '.join(node.text().split()[-12:])})", "check that the server runs and that its port "
                          "is open; the site's Flower log is " + str(folder / "supernode.log"))
