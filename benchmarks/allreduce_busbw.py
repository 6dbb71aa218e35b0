"""Allreduce bus bandwidth against the device's bound, as nccl-tests reports it, in one run.

    python benchmarks/allreduce_busbw.py [--sizes-mb 16,64,256] [--iterations 20] [--device cuda]
    python benchmarks/allreduce_busbw.py --device cpu --sizes-mb 1 --iterations 2   # the code paths, on gloo

One process per GPU (``--ranks``, default: every GPU this process sees; 2 processes of gloo on a CPU), joined
in a process group (NCCL on GPUs), each all-reducing float32 buffers of ``--sizes-mb`` in place: the median
time t of ``--iterations`` after warm-up gives algbw = S / t and busbw = algbw x 2 (N - 1) / N (the bytes each
rank's link carries in a ring). The bound is measured in the same run: with two or more GPUs the copy
bandwidth from GPU 0 to GPU 1 (NVLink or PCIe, one direction: a ring's link); the device's own copy bandwidth
(read + write of S within rank 0's device) is printed beside it. With one GPU there is no link: busbw is
skipped with a message and only the device's copy bandwidth is printed. Figures, not asserts: exits 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time


def timed(fn, iterations: int, sync) -> float:
    """Median seconds of ``fn()`` over ``iterations`` calls after two untimed ones."""
    fn(), fn()
    sync()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rank_main(rank: int, args, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.ranks)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = args.ranks
    rows = []
    for mb in args.sizes_mb:
        buf = torch.ones(int(mb * 2**20) // 4, device=device)
        t = timed(lambda: dist.all_reduce(buf), args.iterations, sync)  # noqa: B023 - called at once
        size = buf.numel() * 4
        rows.append((mb, t, size / t, size / t * 2 * (n - 1) / n))
    dist.barrier()
    if rank == 0:
        big = torch.ones(int(max(args.sizes_mb) * 2**20) // 4, device=device)
        other = torch.empty_like(big)
        copy = timed(lambda: other.copy_(big), args.iterations, sync)
        link = None
        if cuda and n > 1:
            peer = torch.empty_like(big, device=torch.device("cuda", 1))
            link = big.numel() * 4 / timed(lambda: peer.copy_(big), args.iterations, sync)
        queue.put({"rows": rows, "device_copy": 2 * big.numel() * 4 / copy, "link": link,
                   "name": torch.cuda.get_device_name(device) if cuda else "cpu"})
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--ranks", type=int, help="processes (default: the GPUs seen; 2 on cpu)")
    ap.add_argument("--sizes-mb", type=lambda s: [float(x) for x in s.split(",")], default=[16.0, 64.0, 256.0])
    ap.add_argument("--iterations", type=int, default=20)
    args = ap.parse_args(argv)
    import torch
    import torch.multiprocessing as mp

    if args.device == "cuda" and not torch.cuda.is_available():
        print("allreduce bus bandwidth: no GPU here (--device cpu runs the code paths on gloo)")
        return 0
    args.ranks = args.ranks or (torch.cuda.device_count() if args.device == "cuda" else 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(rank_main, args=(args, port, queue), nprocs=args.ranks, join=True)
    res = queue.get()
    print(f"allreduce ({'nccl' if args.device == 'cuda' else 'gloo'}), {args.ranks} rank(s) on {res['name']}, "
          f"medians of {args.iterations}")
    for mb, t, alg, bus in res["rows"]:
        print(f"  {mb:g} MB: {t * 1e3:.3f} ms, algbw {alg / 1e9:.2f} GB/s, busbw {bus / 1e9:.2f} GB/s")
    print(f"device copy bandwidth (read + write): {res['device_copy'] / 1e9:.1f} GB/s")
    best = max(r[3] for r in res["rows"])
    if res["link"]:
        print(f"busbw / link bound: {best / res['link']:.3f} (GPU 0 -> 1 copy {res['link'] / 1e9:.1f} GB/s)")
    else:
        print("busbw / link bound: skipped: one device has no link to measure (run it with 2 or more GPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
