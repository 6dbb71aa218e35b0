"""The scaling model of ``autocnnp scale``: one rank's step (compute, backward, data) plus what the
strategy sends (:class:`~autocnnp.generator.protocols.Traffic`) over a link (latency, bandwidth) gives the
step time, throughput, speedup and efficiency at every rank count. Pure arithmetic: no torch here.

Per step and rank: ``step = wait + compute + exposed communication + read`` when the loader has no workers,
else ``wait + max(compute + exposed communication, read / workers)`` (the workers read ahead, up to their
capacity), where ``wait`` is the wait for the minibatch the profile measured and ``read`` what the data
path adds to a minibatch's reading. A ring allreduce of S bytes over n ranks takes ``2(n-1)/n * S/B + 2(n-1) * a``; with an
overlap fraction f of the backward pass b only ``max((1-f) T, T - f b)`` is exposed (bucket k of K
leaves when the backward has produced it, the last bucket never overlaps: f = 1 - 1/K). A parameter
server's link carries every other rank's S in, then as much out: ``2 (n-1) S/B + 2a``. An exchange made
once every K steps costs ``T / K`` per step. Shared data (NFS) is read by every rank at once through the
server's bandwidth: ``ranks * batch * sample_bytes / B``; a local disk is shared by a node's ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import JobError, Source
from ..core.text import text_table
from ..generator.protocols import Traffic

GB = 1e9


@dataclass(frozen=True)
class Link:
    """A network (or shared-memory) link between ranks: one-way latency (s) and bandwidth (bytes/s)."""

    latency_s: float
    bandwidth: float
    name: str = "custom"


# Point-to-point figures as MPI benchmarks (OSU osu_latency / osu_bw) report them for each kind of link;
# bandwidths are the links' data rates, the usual ceiling of what a large message reaches.
LINKS = {
    # Open MPI's shared-memory transport (vader) on one node: ~0.3 us, ~10 GB/s for large messages
    # (OSU benchmarks on Xeon/EPYC nodes; memcpy-bound).
    "shm": Link(0.3e-6, 10 * GB, "shm"),
    # Ethernet with TCP: 10/25/100 Gb/s line rate; latency of the kernel TCP stack, ~25/15/10 us
    # (Open MPI TCP BTL osu_latency on common NICs).
    "10gbe": Link(25e-6, 10 / 8 * GB, "10gbe"),
    "25gbe": Link(15e-6, 25 / 8 * GB, "25gbe"),
    "100gbe": Link(10e-6, 100 / 8 * GB, "100gbe"),
    # InfiniBand 4x FDR 56 Gb/s (54.5 Gb/s of data after 64b/66b encoding), ~0.7 us; 4x EDR 100 Gb/s, ~0.6 us
    # (Mellanox ConnectX-3/-4 data sheets and OSU results).
    "ib-fdr": Link(0.7e-6, 54.5 / 8 * GB, "ib-fdr"),
    "ib-edr": Link(0.6e-6, 100 / 8 * GB, "ib-edr"),
    # NVLink 3 (A100): 300 GB/s each way per GPU (12 links x 25 GB/s), ~2 us GPU-to-GPU through NCCL
    # (NVIDIA A100 data sheet; nccl-tests).
    "nvlink": Link(2e-6, 300 * GB, "nvlink"),
}


@dataclass(frozen=True)
class DataPath:
    """Where the minibatches come from: ``ram`` (nothing added to the measured data time), ``disk`` (each
    node's disk, shared by its ranks) or ``nfs`` (one server shared by every rank), at ``bandwidth``
    bytes/s."""

    kind: str = "ram"
    bandwidth: float = math.inf

    def read_s(self, world_size: int, ranks_per_node: int, batch_bytes: float) -> float:
        """Seconds to read one minibatch of ``batch_bytes`` on every rank at once."""
        if self.kind == "ram":
            return 0.0
        readers = world_size if self.kind == "nfs" else min(world_size, ranks_per_node)
        return readers * batch_bytes / self.bandwidth

    def describe(self) -> str:
        return self.kind if self.kind == "ram" else f"{self.kind} at {self.bandwidth / GB:g} GB/s"


def option(name: str) -> Source:
    """Where a bad ``autocnnp scale`` option was given, for its error."""
    return Source(Path("."), text=f"autocnnp scale {name}")


def parse_data_path(text: str) -> DataPath:
    """``ram``, ``disk:GBPS`` or ``nfs:GBPS`` (GB/s, decimal)."""
    kind, _, rate = text.partition(":")
    if kind == "ram" and not rate:
        return DataPath()
    try:
        bandwidth = float(rate) * GB
    except ValueError:
        bandwidth = 0.0
    if kind not in ("disk", "nfs") or not bandwidth > 0:
        raise JobError(option("--data-path"), f"'{text}' is not a data path",
                       "write ram, disk:GBPS or nfs:GBPS with the bandwidth in GB/s, e.g. nfs:1.25")
    return DataPath(kind, bandwidth)


@dataclass(frozen=True)
class Profile:
    """One rank's step, per number of threads it gets: compute (forward, backward, optimizer), the backward
    part of it, and the loader's time per minibatch; plus what the step moves."""

    batch: int  # samples per rank and step
    compute_s: dict[int, float]  # threads -> seconds
    backward_s: dict[int, float]
    data_s: dict[int, float]  # the step's wait for its minibatch, what the job's loader leaves exposed
    grad_bytes: int
    model_bytes: int
    sample_bytes: int
    loader_workers: int  # the job's: they read ahead while the rank computes
    train_samples: int | None = None  # for strategies that exchange once per epoch or round
    # threads -> seconds a step waits in the job's strategy's exchange among the copies profiled together on
    # this node (the ranks that share it), measured while they train: the node's own exchange, contention included
    exchange_s: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Placement:
    """How ranks sit on nodes: ``ranks_per_node`` at most on one node, ``cores`` per node; a rank gets
    ``cpus_per_task`` threads when that is above 1, else the node's cores shared by its ranks."""

    ranks_per_node: int
    cores: int
    cpus_per_task: int

    def threads(self, world_size: int) -> int:
        if self.cpus_per_task > 1:
            return self.cpus_per_task
        return max(1, self.cores // min(world_size, self.ranks_per_node))


@dataclass(frozen=True)
class Row:
    """The prediction at one rank count (times in seconds)."""

    world_size: int
    threads: int
    compute_s: float
    data_s: float
    comm_s: float  # the whole exchange, per step
    exposed_s: float  # the part of it the step waits for
    step_s: float
    samples_s: float
    speedup: float = 1.0
    efficiency: float = 1.0


def ring_allreduce_s(size: float, world_size: int, link: Link) -> float:
    """Ring allreduce of ``size`` bytes: reduce-scatter then allgather, 2(n-1) steps of size/n each."""
    if world_size < 2:
        return 0.0
    return 2 * (world_size - 1) / world_size * size / link.bandwidth + 2 * (world_size - 1) * link.latency_s


def server_exchange_s(size: float, world_size: int, link: Link) -> float:
    """Every other rank pushes ``size`` bytes into the server, then pulls as much back: the server's link
    carries (n-1) * size each way, one way after the other."""
    if world_size < 2:
        return 0.0
    return 2 * (world_size - 1) * size / link.bandwidth + 2 * link.latency_s


def exposed_s(comm_s: float, backward_s: float, overlap: float) -> float:
    """What the step waits for of a ``comm_s`` exchange overlapped with a fraction ``overlap`` of the
    backward pass: the last part never hides, the rest hides as far as the backward lasts."""
    return max((1 - overlap) * comm_s, comm_s - overlap * backward_s)


def bucket_overlap(grad_bytes: int, bucket_bytes: float) -> float:
    """Overlap fraction of gradients reduced in buckets of ``bucket_bytes``: all but the last of K buckets."""
    buckets = max(1, math.ceil(grad_bytes / bucket_bytes))
    return 1 - 1 / buckets


def exchange_s(traffic: Traffic, world_size: int, link: Link) -> float:
    """One exchange of ``traffic`` among ``ranks`` ranks."""
    if traffic.pattern == "ring":
        return ring_allreduce_s(traffic.bytes, world_size, link)
    if traffic.pattern == "server":
        return server_exchange_s(traffic.bytes, world_size, link)
    return 0.0


def node_exchange_s(profile: Profile, world_size: int, threads: int, placement: Placement) -> float:
    """The step's wait in the exchange among ranks that all sit on this node, as the profile measured it: the
    job's own strategy among as many copies, each with ``threads`` threads (its overlap with the backward
    pass and the cores' contention included). 0 where nothing was measured or the ranks span nodes."""
    if not 1 < world_size <= placement.ranks_per_node:
        return 0.0
    return profile.exchange_s.get(threads, 0.0)


def predict(profile: Profile, traffic: Callable[[int], Traffic], link: Link, world_sizes: list[int], *,
            placement: Placement, data_path: DataPath = DataPath(), overlap: float) -> list[Row]:
    """The model's row for every rank count; speedup and efficiency against the first (usually 1 rank).
    ``traffic(n)`` is the strategy's traffic with n ranks; ``overlap`` the default overlap fraction for
    traffic that does not fix its own."""
    rows = []
    for n in world_sizes:
        t = placement.threads(n)
        compute, backward = _at(profile.compute_s, t), _at(profile.backward_s, t)
        tr = traffic(n)
        comm = exchange_s(tr, n, link)
        exposed = exposed_s(comm, backward, overlap if tr.overlap is None else tr.overlap) / tr.every_steps
        measured = node_exchange_s(profile, n, t, placement)
        if measured > exposed:  # the node's own exchange, measured, costs more than the link model says
            comm = exposed = measured
        wait = _at(profile.data_s, t)
        read = data_path.read_s(n, placement.ranks_per_node, profile.batch * profile.sample_bytes)
        work = compute + exposed
        step = wait + (work + read if profile.loader_workers == 0 else max(work, read / profile.loader_workers))
        data = wait + read
        rows.append(Row(n, t, compute, data, comm / tr.every_steps, exposed, step, tr.workers * profile.batch / step))
    base = rows[0]
    return [Row(**{**asdict(r), "speedup": r.samples_s / base.samples_s,
                   "efficiency": r.samples_s / base.samples_s * base.world_size / r.world_size}) for r in rows]


def _at(by_threads: dict[int, float], threads: int) -> float:
    """The value measured with ``threads`` threads, else with the nearest number measured."""
    if threads in by_threads:
        return by_threads[threads]
    return by_threads[min(by_threads, key=lambda k: (abs(k - threads), k))]


def powers_of_two(top: int) -> list[int]:
    """1, 2, 4, ..., up to ``top`` (and ``top`` itself)."""
    out = [1 << i for i in range(top.bit_length()) if 1 << i <= top]
    return out if out[-1] == top else [*out, top]


def table(rows: list[Row]) -> str:
    """The prediction as an aligned text table."""
    head = ("ranks", "threads", "compute ms", "data ms", "comm ms", "exposed ms", "step ms", "samples/s",
            "speedup", "efficiency")
    body = [(str(r.world_size), str(r.threads), f"{1e3 * r.compute_s:.2f}", f"{1e3 * r.data_s:.2f}",
             f"{1e3 * r.comm_s:.2f}", f"{1e3 * r.exposed_s:.2f}", f"{1e3 * r.step_s:.2f}", f"{r.samples_s:.1f}",
             f"{r.speedup:.2f}x", f"{100 * r.efficiency:.1f}%") for r in rows]
    return text_table(head, body, left=0)


@dataclass
class Report:
    """What ``--json`` writes: the inputs of the model and its rows."""

    title: str
    link: Link
    data_path: str
    overlap: float
    placement: Placement
    profile: Profile
    rows: list[Row] = field(default_factory=list)

    def jsonable(self) -> dict:
        out = asdict(self)
        out["profile"] = {k: ({str(t): s for t, s in v.items()} if isinstance(v, dict) else v)
                          for k, v in out["profile"].items()}
        return out


def plot(rows: list[Row], path, title: str):
    """Speedup (against ideal) and efficiency over the rank counts, to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .lr_plot import save_figure

    world_sizes = [r.world_size for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.loglog(world_sizes, [r.speedup for r in rows], "o-", label="predicted", base=2)
    left.loglog(world_sizes, [n / world_sizes[0] for n in world_sizes], "k:", label="ideal", base=2)
    left.set_xlabel("ranks")
    left.set_ylabel("speedup")
    left.legend(fontsize=8)
    right.semilogx(world_sizes, [100 * r.efficiency for r in rows], "o-", base=2)
    right.set_ylim(0, 105)
    right.set_xlabel("ranks")
    right.set_ylabel("efficiency (%)")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
