"""Gradient allreduce vs the ring bound: achieved allreduce time of a model's gradients against
``2 (N-1)/N x S / B``, with the link bandwidth B measured in the same run.

    python benchmarks/allreduce_bound.py [--ranks 2] [--models 3x16,4x32] [--iterations 20]

Starts ``--ranks`` ranks (``mpirun``; the script re-launches itself) joined in a gloo process
group, as autocnnp's CPU ranks are. For each U-Net (``DEPTHxBASE_CHANNELS``, from
``components/architectures/unet.py``; 3x16 is the CPU throughput benchmark's model, 4x32 the U-Net
default and the GPU benchmark's model) with S bytes of float32 gradients it measures:

* flat: ``dist.all_reduce`` of one float32 tensor of S bytes;
* DDP buckets: what ``ring_allreduce`` (DistributedDataParallel, 25 MB buckets) sends, timed by a
  communication hook that lines the ranks up (barrier, untimed) and all-reduces each bucket
  synchronously; the sum over the buckets of one backward pass (so without DDP's overlap with the
  backward computation);
* DDP exposed: backward-pass time with DDP minus the same under ``no_sync()`` (what the overlap leaves
  visible in a training step);

and, between ranks 0 and 1, the point-to-point bandwidth B (ping-pong of a ``--p2p-mb`` buffer with
``dist.send``/``dist.recv``, one-way time = round trip / 2) and latency a (4-byte ping-pong). The
table gives the ring bound ``2 (N-1)/N x S / B``, the ratio achieved / bound (1.0 = the ring
algorithm at full link speed; a ring allreduce cannot beat it), and the bound with the latency term
``2 (N-1) a`` added. Medians of ``--iterations`` repetitions. Figures, not asserts: exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import init_process_group, ranks_result, table  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--launcher", choices=("auto", "mpirun", "torchrun"), default="auto")
    ap.add_argument("--models", default="3x16,4x32", help="U-Nets as DEPTHxBASE_CHANNELS, comma-separated")
    ap.add_argument("--in-channels", type=int, default=4)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--p2p-mb", type=float, default=32.0, help="buffer size of the bandwidth ping-pong")
    ap.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ranks < 2:
        ap.error("an allreduce needs at least 2 ranks")
    args.model_list = [tuple(int(v) for v in m.lower().split("x")) for m in args.models.split(",") if m.strip()]
    return args


# ---------------------------------------------------------------------------------------------
# rank side


def _timed(fn, iterations: int, warmup: int = 3) -> list[float]:
    import torch.distributed as dist

    times = []
    for i in range(warmup + iterations):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _p2p(rank: int, nbytes: int, iterations: int) -> list[float]:
    """One-way transfer times of ``nbytes`` between ranks 0 and 1 (round trip / 2); others idle."""
    import torch
    import torch.distributed as dist

    buf = torch.zeros(max(1, nbytes // 4), dtype=torch.float32)

    def ping():
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)

    return [t / 2 for t in _timed(ping, iterations)]


def _ddp(depth: int, base: int, args, world) -> dict:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from autocnnp.components.architectures.unet import UNet

    torch.manual_seed(0)
    net = UNet(args.in_channels, args.classes, depth=depth, base_channels=base, norm="batch")
    size = sum(p.numel() for p in net.parameters() if p.requires_grad)
    flat = torch.zeros(size, dtype=torch.float32)
    flat_times = _timed(lambda: dist.all_reduce(flat), args.iterations)

    model = DistributedDataParallel(net, bucket_cap_mb=25)
    buckets: list[float] = []
    sizes: list[int] = []

    def sync_allreduce(state, bucket):
        buf = bucket.buffer()
        dist.barrier()  # ranks reach a bucket at slightly different times: time the transfer, not the skew
        start = time.perf_counter()
        dist.all_reduce(buf)
        buckets.append(time.perf_counter() - start)
        sizes.append(buf.numel())
        buf.div_(world.world_size)
        fut = torch.futures.Future()
        fut.set_result(buf)
        return fut

    side = 2 ** (depth - 1) * 4
    x = torch.randn(1, args.in_channels, side, side)

    def backward():
        model(x).float().mean().backward()

    # exposed communication: backward with DDP's own (overlapped) allreduce vs without communication,
    # alternated so that the machine's drift hits both alike
    def local():
        with model.no_sync():
            backward()

    with_comm, without = [], []
    for _ in range(args.iterations):
        with_comm += _timed(backward, 1, warmup=1)
        without += _timed(local, 1, warmup=1)
    model.register_comm_hook(None, sync_allreduce)
    per_pass, counts = [], []
    for i in range(3 + args.iterations):
        buckets.clear()
        sizes.clear()
        dist.barrier()
        backward()
        if i >= 3:
            per_pass.append(sum(buckets))
            counts.append(len(buckets))
    return {"model": f"{depth}x{base}", "params": size, "flat": flat_times, "ddp": per_pass,
            "buckets": counts[-1], "bucket_elems": list(sizes), "exposed": statistics.median(with_comm)
            - statistics.median(without), "backward": statistics.median(without)}


def worker(args) -> int:
    import torch

    from autocnnp.core.world import discover_world

    world = discover_world()
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, world.local_world_size)))
    init_process_group("gloo", world)
    nbytes = int(args.p2p_mb * 2**20)
    result = {"latency": _p2p(world.rank, 4, args.iterations * 5),
              "p2p": _p2p(world.rank, nbytes, args.iterations), "p2p_bytes": nbytes, "models": []}
    for depth, base in args.model_list:
        result["models"].append(_ddp(depth, base, args, world))
    # bandwidth once more at the end: the machine is shared, take the better of the two
    result["p2p_end"] = _p2p(world.rank, nbytes, args.iterations)
    result["threads"] = torch.get_num_threads()
    if world.rank == 0:
        (Path(args.worker) / "result.json").write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# launcher side


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    res = ranks_result(Path(__file__).resolve(), args.ranks, argv if argv is not None else sys.argv[1:],
                       args.launcher, "allreduce_bound")
    if res is None:
        return 0

    n = args.ranks
    alpha = statistics.median(res["latency"])
    p2p = res["p2p"] + res["p2p_end"]
    one_way, best_way = statistics.median(p2p), min(p2p)
    bandwidth, best_bandwidth = res["p2p_bytes"] / one_way, res["p2p_bytes"] / best_way  # bytes/s
    print(f"allreduce vs ring bound: {n} ranks, gloo, {res['threads']} compute thread(s)/rank; "
          f"{args.iterations} runs of each")
    print(f"point-to-point (ranks 0<->1, send/recv ping-pong of {res['p2p_bytes'] / 2**20:.0f} MiB): "
          f"B = {bandwidth / 1e9:.2f} GB/s median, {best_bandwidth / 1e9:.2f} GB/s best; "
          f"latency a = {alpha * 1e6:.0f} us (4 bytes, median)")
    rows = []
    factor = 2 * (n - 1) / n
    for m in res["models"]:
        s = m["params"] * 4
        bound, best_bound = factor * s / bandwidth, factor * s / best_bandwidth
        bound_lat = bound + 2 * (n - 1) * alpha
        for label, times in (("flat all_reduce", m["flat"]), (f"DDP, {m['buckets']} bucket(s)", m["ddp"])):
            t, best = statistics.median(times), min(times)
            rows.append((f"U-Net {m['model']}: {label}", f"{s / 2**20:.2f}", f"{t * 1e3:.3f}", f"{bound * 1e3:.3f}",
                         f"{t / bound:.2f}", f"{best * 1e3:.3f}", f"{best_bound * 1e3:.3f}", f"{best / best_bound:.2f}",
                         f"{bound_lat * 1e3:.3f}", f"{t / bound_lat:.2f}"))
    print(table(("", "S MiB", "achieved ms", "bound ms", "ratio", "best ms", "best-B bound", "ratio",
                 "bound+lat ms", "ratio"), rows))
    print("bound = 2(N-1)/N x S / B (B median; best-B: the fastest transfer); bound+lat adds 2(N-1) x a; "
          "achieved = median (best = fastest run); ratio = achieved / bound, 1.0 = the ring at link speed")
    for m in res["models"]:
        print(f"U-Net {m['model']}: backward pass {m['backward'] * 1e3:.1f} ms without communication (no_sync), "
              f"{m['exposed'] * 1e3:+.1f} ms with DDP (exposed allreduce, BN buffer broadcast and waiting for the "
              "slower rank)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
