"""Where the ranks of several hosts meet: each host's address that the other hosts reach, agreed over MPI
and checked before training (communication_init ``torch_distributed``, ``tf_config``, ``horovod``).

Each host chooses, in this order: the ``interface`` setting (an interface name, or an address or network
that one of its addresses is in), else ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` where one names an
interface of the host, else a non-loopback address its host name resolves to, else the address of the
interface that the route to the other hosts leaves through (stock Debian and Ubuntu map the host name
to 127.0.1.1, which only the host itself reaches). Then every host opens a connection to every other
one within ``connect_timeout_s``; when one cannot, every rank ends with one line naming the host, the
address tried, why it was chosen and the fix. ``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME`` are set
to the chosen interface, so gloo and NCCL use the same one.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from autocnnp.core.errors import DataError
from autocnnp.core.settings import setting
from autocnnp.core.world import discover_world, launcher_name

IFNAME_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


@dataclass
class RendezvousConfig:
    """How the ranks of several hosts reach each other."""

    interface: str = setting("", aliases=("socket_ifname",), help=(
        "interface (eth0), or address or network (10.1.0.0/16), on which the hosts reach each other; "
        "default: where the host name resolves, else where the route to the other hosts leaves"))
    connect_timeout_s: float = setting(15.0, gt=0.0, help=(
        "before training, each host must open a connection to every other one within this, else the job "
        "ends naming the cause"))


@dataclass(frozen=True)
class Address:
    """One host's rendezvous address and why it was chosen (``address`` empty: none, ``why`` says why)."""

    host: str
    address: str
    interface: str
    why: str
    others: tuple[str, ...] = ()  # the host's usable addresses, as ``interface address``: for the hint
    named_by: str = ""  # the setting that chose it, if any


class Unreachable(DataError):
    """The hosts cannot reach each other where they agreed to meet: nothing trained (exit code 2).
    Every rank raises it; only ``reporter`` prints it."""

    def __init__(self, problem: str, hint: str, reporter: int):
        super().__init__(None, problem, hint)
        self.reporter = reporter

    def __reduce__(self):
        return (type(self), (self.problem, self.hint, self.reporter))


def _ip(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def interfaces() -> dict[str, list[str]]:
    """This host's interfaces and their IPv4 and routable IPv6 addresses (IPv4 first)."""
    import psutil

    out = {}
    for name, infos in psutil.net_if_addrs().items():
        addrs = [_ip(i.address.split("%")[0]) for i in infos if i.family in (socket.AF_INET, socket.AF_INET6)]
        addrs = [a for a in addrs if a is not None and not a.is_link_local]
        out[name] = [str(a) for a in sorted(addrs, key=lambda a: a.version)]
    return out


def usable(ifaces: dict[str, list[str]]) -> tuple[str, ...]:
    """``interface address`` for each non-loopback address of ``ifaces``."""
    return tuple(f"{name} {a}" for name, addrs in ifaces.items() for a in addrs if not _ip(a).is_loopback)


def resolve(host: str) -> list[str]:
    """The addresses ``host`` resolves to here, in the resolver's order (none when it does not)."""
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return list(dict.fromkeys(info[4][0].split("%")[0] for info in found))


def _source_toward(address: str) -> str | None:
    """The local address the route to ``address`` leaves from (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((address, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def choose(config: RendezvousConfig, host: str, ifaces: dict[str, list[str]],
           peers: list[tuple[str, list[str]]]) -> Address:
    """This host's address for the other hosts (``peers``: each other host and addresses to route to)."""
    owner = {a: name for name, addrs in ifaces.items() for a in addrs}
    others = usable(ifaces)
    wanted, named_by = config.interface, "communication_init interface"
    if not wanted:
        wanted, named_by = next(((os.environ[v], v) for v in IFNAME_VARIABLES if os.environ.get(v) in ifaces),
                                ("", ""))
    if wanted:
        named_by = f"{named_by}={wanted}"
        if wanted in ifaces:
            if not ifaces[wanted]:
                return Address(host, "", wanted, f"interface {wanted} has no address ({named_by})", others, named_by)
            return Address(host, ifaces[wanted][0], wanted, f"it is interface {wanted}'s address, set by {named_by}",
                           others, named_by)
        try:
            network = ipaddress.ip_network(wanted, strict=False)
        except ValueError:
            return Address(host, "", "", f"{named_by} is neither an interface of {host} ({', '.join(sorted(ifaces))}) "
                           "nor an address", others, named_by)
        inside = [a for a in owner if _ip(a) in network]
        if not inside:
            return Address(host, "", "", f"{host} has no address in {wanted} ({named_by})", others, named_by)
        return Address(host, inside[0], owner[inside[0]], f"it is {host}'s address in {wanted}, set by {named_by}",
                       others, named_by)
    named = resolve(host)
    for a in named:
        if a in owner and not _ip(a).is_loopback:
            return Address(host, a, owner[a], f"the host name {host} resolves to it", others)
    loop = f"the host name {host} resolves to {', '.join(named) or 'nothing'}"
    for peer, addrs in peers:
        for a in addrs:
            source = _source_toward(a) if a not in owner else None
            if source in owner and not _ip(source).is_loopback:
                return Address(host, source, owner[source], f"{loop}, and the route to {peer} ({a}) leaves "
                               f"through it", others)
    fallback = named[0] if named else "127.0.0.1"
    return Address(host, fallback, owner.get(fallback, ""), f"{loop}, and no interface of {host} routes to the "
                   "other hosts", others)


def endpoint(address: str, port: int) -> str:
    """``address:port``, IPv6 addresses in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def agree(config: RendezvousConfig, comm) -> list[Address]:
    """Each rank's host address, agreed over the MPI communicator ``comm`` and, across several hosts,
    checked (raises :class:`Unreachable`); sets ``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME``.
    On one host without an ``interface`` setting every rank meets on 127.0.0.1."""
    host = socket.gethostname()
    hosts = comm.allgather(host)
    if len(set(hosts)) == 1 and not config.interface:
        return [Address(host, "127.0.0.1", "", f"every rank runs on {host}")] * comm.size
    ifaces = interfaces()
    seen = dict(zip(hosts, comm.allgather(usable(ifaces))))  # each host's addresses, to route toward
    peers = [(h, resolve(h) + [u.split()[1] for u in addrs]) for h, addrs in seen.items() if h != host]
    chosen = comm.allgather(choose(config, host, ifaces, peers))
    failed = next((r for r, a in enumerate(chosen) if not a.address), None)
    if failed is not None:
        a = chosen[failed]
        raise Unreachable(f"host {a.host} has no address for the other hosts to reach it: {a.why}", _hint(a), failed)
    if len(set(hosts)) > 1:
        _check(config, comm, hosts, chosen)
    if chosen[comm.rank].interface:
        os.environ.update(dict.fromkeys(IFNAME_VARIABLES, chosen[comm.rank].interface))
    return chosen


def agree_over_mpi(config: RendezvousConfig) -> None:
    """:func:`agree` over MPI.COMM_WORLD where the ranks are MPI's (mpirun, srun): for Horovod, before
    ``hvd.init()`` (which takes the MPI that mpi4py initialised). Ranks of ``horovodrun --gloo`` have no MPI."""
    if discover_world().world_size > 1 and launcher_name() in ("ompi", "pmi", "slurm"):
        from mpi4py import MPI

        agree(config, MPI.COMM_WORLD)


def _hint(a: Address) -> str:
    """The fix: the setting that chose the address, else the host's /etc/hosts line; TCP between the hosts."""
    has = f"{a.host} has {', '.join(a.others) or 'no address but loopback'}"
    setting_fix = "set communication_init interface to an interface or network on which the hosts reach each other"
    if a.named_by:
        return f"{setting_fix} in place of {a.named_by} ({has}); TCP must pass between the hosts"
    line = f"{a.others[0].split()[1] if a.others else 'ADDRESS'} {a.host}"
    return (f"give {a.host}'s /etc/hosts the line `{line}` ahead of any `127.0.1.1 {a.host}`, or {setting_fix} "
            f"({has}); TCP must pass between the hosts")


def _check(config: RendezvousConfig, comm, hosts: list[str], chosen: list[Address]) -> None:
    """The first rank of each host listens on its host's address; it opens a connection to every other
    host's listener, which answers with a token: the right host answered, within ``connect_timeout_s``."""
    first = {h: hosts.index(h) for h in hosts}
    leads = comm.rank == first[hosts[comm.rank]]
    listener = _Listener(chosen[comm.rank].address) if leads else None
    try:
        doors = comm.allgather(listener.door if listener else None)
        problems = []
        if leads:
            targets = [r for r in first.values() if r != comm.rank]
            with ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
                problems = [p for p in pool.map(lambda r: _knock(r, chosen[r], doors[r], config.connect_timeout_s),
                                                targets) if p]
        found = comm.allgather(problems)
    finally:
        if listener:
            listener.close()
    failed = next((r for r, p in enumerate(found) if p), None)
    if failed is not None:
        target, problem = found[failed][0]
        a = chosen[target]
        loop = (f"; {a.address} is a loopback address, which only {a.host} itself reaches"
                if _ip(a.address).is_loopback else "")
        raise Unreachable(f"host {hosts[failed]} cannot open a connection to host {a.host} at {a.address} "
                          f"({problem}): {a.host} chose {a.address} because {a.why}{loop}", _hint(a), failed)


class _Listener:
    """A socket on ``address`` that answers every connection with a token, in a thread, until closed."""

    def __init__(self, address: str):
        self.token = secrets.token_hex(8).encode()
        try:
            self.sock = socket.create_server((address, 0), family=socket.AF_INET6 if ":" in address else socket.AF_INET)
        except OSError as exc:
            self.sock, self.door = None, (0, b"", f"cannot listen there: {exc.strerror or exc}")
            return
        self.door = (self.sock.getsockname()[1], self.token, "")
        threading.Thread(target=self._answer, daemon=True).start()

    def _answer(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            with conn:
                conn.sendall(self.token)

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread's accept()
            self.sock.close()


def _knock(rank: int, target: Address, door: tuple[int, bytes, str], timeout_s: float) -> tuple[int, str] | None:
    """None when the listener of ``rank`` (on ``target``) answers with its token within ``timeout_s``, else
    (rank, problem)."""
    port, token, trouble = door
    if trouble:
        return rank, trouble
    try:
        with socket.create_connection((target.address, port), timeout=timeout_s) as s:
            got = b""
            while len(got) < len(token) and (chunk := s.recv(len(token) - len(got))):
                got += chunk
    except TimeoutError:
        return rank, f"no answer within connect_timeout_s={timeout_s:g}"
    except OSError as exc:
        return rank, exc.strerror or str(exc)
    return None if got == token else (rank, f"port {port} there is not {target.host}'s")
