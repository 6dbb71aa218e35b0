"""Gradient allreduce vs the ring bound: gloo (what ``ring_allreduce`` uses on CPU) and MPI (the ``mpi``
strategy), each against ``2 (N-1)/N x S / B`` with B measured on its own transport in the same run.

    python benchmarks/allreduce_bound.py [--ranks 2] [--models 3x16,4x32] [--caps 1,5,25,100] [--iterations 20]

Starts ``--ranks`` ranks with ``mpirun`` twice (the script re-launches itself), once with
``--mca btl self,vader,tcp`` (Open MPI's default here: shared memory between ranks on one node) and once with
``--mca btl self,tcp``; ``--rounds`` repeats the pair. The BTL Open MPI picked is read from its own log
(``btl_base_verbose``: "Using vader btl for send"). Each launch joins a gloo process group as autocnnp's CPU
ranks do. For each U-Net (``DEPTHxBASE_CHANNELS``; 3x16 is the CPU throughput benchmark's model, 4x32 the
U-Net default) with S bytes of float32 gradients it measures, alternated so that the machine's drift hits all
alike (medians of ``--iterations``):

* the link of each transport, with an S-byte message between ranks 0 and 1: one-way B (ping-pong, round
  trip / 2), B per direction when both ranks send at once (exchange, what a ring does), and the latency a
  (4 bytes); and the time of the reduction a rank computes in a ring, ``(N-1)/N x S`` bytes summed;
* flat allreduces of S: gloo ``all_reduce``; MPI ``Allreduce(IN_PLACE)`` (the ``mpi`` strategy's call) and
  ``Iallreduce(IN_PLACE)`` (its call before: Open MPI's libnbc); each also while one more thread per rank
  computes (``+ busy``: the backward pass that DDP overlaps with its allreduce), and with the CPU cores it
  keeps busy per rank (process CPU time / wall time, all threads);
* per bucket cap (``--caps`` MB): DDP (``ring_allreduce``) buckets all-reduced one by one after a barrier
  (sum over a backward pass, no overlap); the backward pass with DDP minus the same under ``no_sync()``
  (``exposed``: what overlap leaves visible); the ``mpi`` strategy's ``after_backward`` (copy into the buckets,
  one Allreduce each, gradients as views of them).

Bounds: ``ring`` = ``2 (N-1)/N x S / B`` with the one-way B of the path's transport (1.0 = the ring at link
speed); ``duplex`` = ``2 (N-1)/N x S / B_exchange`` + the reduction time: what a ring can reach when both
directions share the CPU and the CPU also sums. Figures, not asserts: exits 0.

Why the CPU allreduce sits above the ring bound and DDP exposes it (2-core VM shared with other sessions,
load 2-9 during the runs, 2 ranks, U-Net 4x32, S = 7.35 MiB; medians of 10, each figure ranges over runs):

* The ring bound assumes a full-duplex link. On one node the link is CPU copies (TCP loopback: kernel copies
  on both sides; vader: the receiver's single CMA copy), and when both ranks send at once, as every ring step
  does, the directions share the CPU and memory: exchange B / one-way B = 0.81 for gloo, 0.4-0.6 for vader
  (25-31 GB/s one-way, 12-13 GB/s per direction when quiet). The sum of (N-1)/N x S takes another 0.23-0.25
  ms. Against that duplex bound gloo reaches 0.97-1.43 (1.24-1.81 of the ring bound) and MPI Allreduce over
  vader, when undisturbed, 0.8-1.0 (1.8-2.4 of the ring bound: 0.36-0.73 ms).
* Contention: one more computing thread per rank (``+ busy``: the backward pass beside DDP's allreduce) makes
  gloo's allreduce 1.4-2.5x slower (2.6-3.1 of the ring bound): the 2 cores are already taken by the two
  ranks and gloo's threads, so overlap has no core to run on. DDP's default 25 MB cap also puts all 7.35 MiB
  in 1 bucket, reduced only after the whole backward pass: nothing to overlap. Exposed: +8 to +22 ms on a
  30 ms backward; smaller caps (5 MB: 2 buckets, 1 MB: 6) do not hide more.
* MPI busy-polls: a rank descheduled by another process's load stalls its peer for a time slice (4-byte
  latency 2-4 ms under load, against tens of us quiet), so MPI medians on a loaded machine are noise; the
  best runs and quiet-period runs are the figures to read.
* The ``mpi`` strategy's former ``Iallreduce(IN_PLACE)`` goes through libnbc's binomial reduce-to-0 and
  broadcast (chosen for fewer than 4 ranks or an in-place buffer): quiet runs 2.7-6.8 ms against 0.36-0.73 ms
  for the blocking ``Allreduce`` (9-25x the vader ring bound, against 1.8-2.4x).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import init_process_group, run_ranks, table  # noqa: E402

# how each launch restricts Open MPI's byte transfer layers (BTL)
BTLS = {"vader": "self,vader,tcp", "tcp": "self,tcp"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--models", default="3x16,4x32", help="U-Nets as DEPTHxBASE_CHANNELS, comma-separated")
    ap.add_argument("--caps", default="1,5,25,100", help="bucket caps in MB, comma-separated")
    ap.add_argument("--in-channels", type=int, default=4)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=1, help="launch pairs (vader, tcp)")
    ap.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ranks < 2:
        ap.error("an allreduce needs at least 2 ranks")
    args.model_list = [tuple(int(v) for v in m.lower().split("x")) for m in args.models.split(",") if m.strip()]
    args.cap_list = [float(c) for c in args.caps.split(",") if c.strip()]
    return args


# ---------------------------------------------------------------------------------------------
# rank side


class BusyCore:
    """A thread that computes (small matmuls, no GIL held inside) while ``on`` is set: the backward pass
    beside an overlapped allreduce."""

    def __init__(self):
        self.on, self.done = threading.Event(), False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import torch

        a = torch.randn(128, 128)
        while not self.done:
            if self.on.wait(0.1):
                torch.mm(a, a)

    def beside(self, fn):
        def run():
            self.on.set()
            try:
                fn()
            finally:
                self.on.clear()
        return run

    def stop(self):
        self.done = True
        self.thread.join()


def _alternated(fns: dict, comm, iterations: int, warmup: int = 2) -> dict[str, dict[str, list[float]]]:
    """Each function once per iteration, in turn, after a barrier: wall and process CPU seconds."""
    out = {name: {"wall": [], "cpu": []} for name in fns}
    for i in range(warmup + iterations):
        for name, fn in fns.items():
            comm.Barrier()
            cpu, start = time.process_time(), time.perf_counter()
            fn()
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            if i >= warmup:
                out[name]["wall"].append(wall)
                out[name]["cpu"].append(cpu)
    return out


def _link(comm, nbytes: int, reduced_elems: int) -> dict[str, list[float]]:
    """Seconds of: one-way transfers of ``nbytes`` (ping-pong / 2), exchanges (both ranks send at once), 4-byte
    one-way latency, between ranks 0 and 1 over gloo and MPI; the sum of ``reduced_elems`` floats."""
    import torch
    import torch.distributed as dist

    rank, peer = comm.rank, 1 - comm.rank
    buf, other = torch.ones(nbytes // 4), torch.ones(nbytes // 4)
    tiny = torch.ones(1)
    acc, addend = torch.ones(reduced_elems), torch.ones(reduced_elems)

    def gloo_pingpong(t):
        def run():
            if rank == 0:
                dist.send(t, 1)
                dist.recv(t, 1)
            elif rank == 1:
                dist.recv(t, 0)
                dist.send(t, 0)
        return run

    def mpi_pingpong(t):
        def run():
            if rank == 0:
                comm.Send(t.numpy(), 1)
                comm.Recv(t.numpy(), 1)
            elif rank == 1:
                comm.Recv(t.numpy(), 0)
                comm.Send(t.numpy(), 0)
        return run

    def gloo_exchange():
        if rank < 2:
            reqs = [dist.isend(buf, peer), dist.irecv(other, peer)]
            for r in reqs:
                r.wait()

    def mpi_exchange():
        if rank < 2:
            comm.Sendrecv(buf.numpy(), peer, recvbuf=other.numpy(), source=peer)

    fns = {"gloo one-way": gloo_pingpong(buf), "gloo exchange": gloo_exchange, "gloo latency": gloo_pingpong(tiny),
           "mpi one-way": mpi_pingpong(buf), "mpi exchange": mpi_exchange, "mpi latency": mpi_pingpong(tiny),
           "reduction": lambda: acc.add_(addend)}
    times = {k: v["wall"] for k, v in _alternated(fns, comm, 10).items()}
    for key in ("gloo one-way", "gloo latency", "mpi one-way", "mpi latency"):
        times[key] = [t / 2 for t in times[key]]
    return times


def _flat(comm, numel: int, iterations: int, busy: BusyCore) -> dict:
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    flat = torch.zeros(numel, dtype=torch.float32)
    arr = flat.numpy()
    paths = {"gloo all_reduce": lambda: dist.all_reduce(flat),
             "mpi Allreduce": lambda: comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM),
             "mpi Iallreduce (before)": lambda: comm.Iallreduce(MPI.IN_PLACE, arr, op=MPI.SUM).Wait()}
    paths |= {f"{name} + busy": busy.beside(fn) for name, fn in list(paths.items())[:2]}
    return _alternated(paths, comm, iterations)


def _buckets(depth: int, base: int, cap: float, args, world, comm) -> dict:
    """DDP and the mpi strategy with bucket cap ``cap`` on the same U-Net and input."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from autocnnp.components.architectures.unet import UNet
    from autocnnp.components.strategies.mpi import Config, MPIAllreduce

    def unet():
        torch.manual_seed(0)
        return UNet(args.in_channels, args.classes, depth=depth, base_channels=base, norm="batch")

    ddp = DistributedDataParallel(unet(), bucket_cap_mb=cap)
    strategy = MPIAllreduce(Config(bucket_cap_mb=cap), world=world, device=torch.device("cpu"))
    plain = strategy.wrap(unet())
    side = 2 ** (depth - 1) * 4
    x = torch.randn(1, args.in_channels, side, side)

    def backward(model):
        model.zero_grad(set_to_none=True)
        model(x).float().mean().backward()

    def local():
        with ddp.no_sync():
            backward(ddp)

    mpi_times = []

    def mpi_step():  # backward untimed, then the strategy's communication, as the trainer calls it
        backward(plain)
        comm.Barrier()
        start = time.perf_counter()
        strategy.after_backward(plain)
        mpi_times.append(time.perf_counter() - start)

    runs = _alternated({"ddp": lambda: backward(ddp), "no_sync": local, "mpi": mpi_step}, comm, args.iterations)
    reduced, sizes = [], []

    def sync_allreduce(state, bucket):
        buf = bucket.buffer()
        comm.Barrier()  # ranks reach a bucket at slightly different times: time the transfer, not the skew
        start = time.perf_counter()
        dist.all_reduce(buf)
        reduced.append(time.perf_counter() - start)
        sizes.append(buf.numel())
        buf.div_(world.world_size)
        fut = torch.futures.Future()
        fut.set_result(buf)
        return fut

    ddp.register_comm_hook(None, sync_allreduce)
    per_pass = []
    for i in range(2 + args.iterations):
        reduced.clear()
        sizes.clear()
        comm.Barrier()
        backward(ddp)
        if i >= 2:
            per_pass.append(sum(reduced))
    return {"cap": cap, "ddp_buckets": len(sizes), "mpi_buckets": len(strategy.buckets), "gloo_buckets": per_pass,
            "exposed": statistics.median(runs["ddp"]["wall"]) - statistics.median(runs["no_sync"]["wall"]),
            "backward": statistics.median(runs["no_sync"]["wall"]), "mpi": mpi_times[-args.iterations:]}


def worker(args) -> int:
    import torch
    from mpi4py import MPI

    from autocnnp.components.architectures.unet import UNet
    from autocnnp.core.world import discover_world

    world, comm = discover_world(), MPI.COMM_WORLD
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, world.local_world_size)))
    init_process_group("gloo", world)
    busy = BusyCore()
    result = {"threads": torch.get_num_threads(), "models": []}
    try:
        for depth, base in args.model_list:
            net = UNet(args.in_channels, args.classes, depth=depth, base_channels=base, norm="batch")
            numel = sum(p.numel() for p in net.parameters() if p.requires_grad)
            reduced = numel * (world.world_size - 1) // world.world_size
            result["models"].append({
                "model": f"{depth}x{base}", "params": numel, "link": _link(comm, numel * 4, reduced),
                "flat": _flat(comm, numel, args.iterations, busy),
                "caps": [_buckets(depth, base, cap, args, world, comm) for cap in args.cap_list]})
    finally:
        busy.stop()
    if world.rank == 0:
        (Path(args.worker) / "result.json").write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# launcher side


def _launch(argv: list[str], ranks: int, btl: str) -> dict | None:
    """Run the ranks with Open MPI's BTLs restricted to ``btl``; their result, with the BTL Open MPI used
    between ranks (from its verbose log)."""
    folder = Path(tempfile.mkdtemp(prefix="autocnnp-allreduce-bound-"))
    saved = {k: os.environ.get(k) for k in ("OMPI_MCA_btl", "OMPI_MCA_btl_base_verbose")}
    os.environ.update(OMPI_MCA_btl=btl, OMPI_MCA_btl_base_verbose="100")
    try:
        log = folder / "ranks.log"
        rc = run_ranks(Path(__file__).resolve(), ranks, [*argv, "--worker", str(folder)], "mpirun", log=log)
        if rc != 0 or not (folder / "result.json").exists():
            print(f"allreduce_bound: the ranks failed (exit code {rc}) with btl {btl}", file=sys.stderr)
            return None
        result = json.loads((folder / "result.json").read_text())
        used = sorted(set(re.findall(r"Using (\w+) btl for send", log.read_text(errors="replace"))))
        result["btl_used"] = ",".join(used) or "?"
        return result
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(folder, ignore_errors=True)


def _pooled(runs: list[dict], pick) -> list[float]:
    return [t for r in runs for t in pick(r)]


def _both(seconds: list[float]) -> str:
    """``median (best)`` milliseconds."""
    return f"{statistics.median(seconds) * 1e3:.3f} ({min(seconds) * 1e3:.3f})"


def _rate(nbytes: int, seconds: list[float]) -> str:
    """``median (best)`` GB/s of moving ``nbytes`` in ``seconds``."""
    return f"{nbytes / statistics.median(seconds) / 1e9:.2f} ({nbytes / min(seconds) / 1e9:.2f})"


def _ratios(values: list[float], bound: tuple[float, float]) -> str:
    """Achieved / bound: median over the median-B bound (best over the best-B bound)."""
    return f"{statistics.median(values) / bound[0]:.2f} ({min(values) / bound[1]:.2f})"


def report(args, launches: dict[str, list[dict]]) -> None:
    n = args.ranks
    factor = 2 * (n - 1) / n
    every = [r for runs in launches.values() for r in runs]
    first = every[0]
    print(f"allreduce vs ring bound: {n} ranks, {first['threads']} compute thread(s)/rank, {args.iterations} "
          f"runs of each, {args.rounds} launch pair(s); MPI launches: " + "; ".join(
              f"--mca btl {BTLS[k]} -> Open MPI used {', '.join(sorted({r['btl_used'] for r in runs}))}"
              for k, runs in launches.items()))
    for mi, m in enumerate(first["models"]):
        s = m["params"] * 4
        # transport -> the launches that measured it, and its key in the link figures
        transports = {"gloo tcp-loopback": (every, "gloo"), **{f"mpi {k}": (runs, "mpi") for k, runs in launches.items()}}

        def figures(runs, pick):
            return _pooled(runs, lambda r: pick(r["models"][mi]))

        links = {name: {f: figures(runs, lambda m, f=f, key=key: m["link"][f"{key} {f}"])
                        for f in ("one-way", "exchange", "latency")} for name, (runs, key) in transports.items()}
        reduction = figures(every, lambda m: m["link"]["reduction"])

        def bounds(transport: str) -> tuple[tuple[float, float], tuple[float, float]]:
            """(ring, duplex) bounds, each (from median figures, from best figures)."""
            ln = links[transport]
            ring = tuple(factor * pick(ln["one-way"]) for pick in (statistics.median, min))
            duplex = tuple(factor * pick(ln["exchange"]) + pick(reduction) for pick in (statistics.median, min))
            return ring, duplex

        print(f"\nU-Net {m['model']}: S = {s / 2**20:.2f} MiB of float32 gradients; summing (N-1)/N x S takes "
              f"{_both(reduction)} ms")
        print(table(("link, S-byte messages", "one-way B GB/s", "exchange B GB/s/dir", "exchange/one-way",
                     "latency us"),
                    [(k, _rate(s, v["one-way"]), _rate(s, v["exchange"]),
                      f"{statistics.median(v['one-way']) / statistics.median(v['exchange']):.2f}",
                      f"{statistics.median(v['latency']) * 1e6:.0f}") for k, v in links.items()]))
        rows = []
        for path in m["flat"]:
            for name in ["gloo tcp-loopback"] if path.startswith("gloo") else [f"mpi {k}" for k in launches]:
                walls = figures(transports[name][0], lambda m, p=path: m["flat"][p]["wall"])
                cpu = figures(transports[name][0], lambda m, p=path: m["flat"][p]["cpu"])
                ring, duplex = bounds(name)
                rows.append((path, name, _both(walls), f"{sum(cpu) / sum(walls):.2f}", _both(list(ring)),
                             _ratios(walls, ring), _both(list(duplex)), _ratios(walls, duplex)))
        print(table(("flat allreduce of S", "transport", "achieved ms", "cores/rank", "ring bound ms", "ratio",
                     "duplex bound ms", "ratio"), rows))

        rows = []
        for ci, c in enumerate(m["caps"]):
            gloo = figures(every, lambda m, ci=ci: m["caps"][ci]["gloo_buckets"])
            ring, duplex = bounds("gloo tcp-loopback")
            row = [f"{c['cap']:g}", str(c["ddp_buckets"]), _both(gloo), _ratios(gloo, ring), _ratios(gloo, duplex),
                   f"{statistics.median(figures(every, lambda m, ci=ci: [m['caps'][ci]['backward']])) * 1e3:.1f}",
                   f"{statistics.median(figures(every, lambda m, ci=ci: [m['caps'][ci]['exposed']])) * 1e3:+.1f}",
                   str(c["mpi_buckets"])]
            for k, runs in launches.items():
                mpi = _pooled(runs, lambda r, ci=ci: r["models"][mi]["caps"][ci]["mpi"])
                row += [_both(mpi), _ratios(mpi, bounds(f"mpi {k}")[0])]
            rows.append(tuple(row))
        head = ["cap MB", "DDP buckets", "gloo ms", "ring ratio", "duplex ratio", "backward ms", "DDP exposed ms",
                "mpi buckets"]
        for k in launches:
            head += [f"mpi {k} ms", "ring ratio"]
        print(table(tuple(head), rows))
    print("\nmedian (best) of the runs; ring bound = 2(N-1)/N x S / B (one-way B of the path's own transport); duplex "
          "bound = 2(N-1)/N x S / B_exchange + the reduction; ratio = achieved / bound (1.0 = at the bound; best: the "
          "fastest run over the bound from the fastest transfers); cores/rank = process CPU time / wall time (all "
          "threads; + busy includes the computing thread); gloo ms = DDP's buckets all-reduced one by one, summed over "
          "a backward pass; DDP exposed = backward with DDP - under no_sync; mpi ms = the mpi strategy's "
          "after_backward (copy in, Allreduce per bucket, gradients as views)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if shutil.which("mpirun") is None:
        print("allreduce_bound: needs Open MPI's mpirun", file=sys.stderr)
        return 0
    argv = argv if argv is not None else sys.argv[1:]
    launches: dict[str, list[dict]] = {k: [] for k in BTLS}
    for _ in range(args.rounds):
        for kind, btl in BTLS.items():
            res = _launch(argv, args.ranks, btl)
            if res is None:
                return 0
            launches[kind].append(res)
    report(args, launches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
