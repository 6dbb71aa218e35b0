"""Distributed optimizers side by side: step time, bytes moved and communication time against the
ring bound, for every dist_strategy built in (and installed), same model, same ranks, one run.

    python benchmarks/strategies.py [--ranks 2] [--model 3x16] [--steps 20] [--warmup 3] [--batch 4]

Starts ``--ranks`` ranks with ``mpirun`` (the script re-launches itself). Each rank initialises both
communication inits the strategies need (a gloo process group and plain mpi4py; horovod's where
installed), then, for each strategy, builds it through the registry as the trainer does, wraps a
freshly seeded U-Net (``DEPTHxBASE_CHANNELS``, batch-norm, 4 -> 4 classes, 32x32 inputs) and an SGD
optimizer (momentum 0.9), and runs the trainer's step (forward, cross-entropy, zero_grad, backward,
``after_backward``, ``optimizer.step()``) for ``--warmup`` + ``--steps`` steps, each epoch closed by
``end_epoch`` (fedavg averages there; a dedicated parameter server serves there).

Columns (medians over the timed steps; per step the slowest rank counts, since the step is synchronous):

* step ms: one training step (for fedavg plus its end-of-round average spread over the round's steps);
* comm ms: the strategy's own communication per step: ``after_backward`` (mpi); ``optimizer.step()``
  push/pull (parameter_server, at a worker, so the server's averaging and update are included);
  the round's average / steps (fedavg). DDP (ring_allreduce) and Horovod overlap their allreduce with
  backward: not separable in their rows; the flat rows time an allreduce of S bytes alone;
* bytes/step/rank from the parameter count: S = 4 x params; ring, mpi: 2(N-1)/N x S; parameter
  server: 2 S per worker (push + pull), i.e. 2 S (N-1) through a shared server's link and 2 S W through
  a dedicated one's; fedavg: 2(N-1)/N x S per round (allreduce of the model) / steps per round;
* vs ring bound: comm ms / (2(N-1)/N x S / B), with B measured in the same run by an mpi4py
  Send/Recv ping-pong of ``--p2p-mb`` between ranks 0 and 1 (one-way time = round trip / 2).

Also the flat allreduce of S bytes with gloo and with MPI, against the same bound. Figures, not
asserts: exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ranks_result, table  # noqa: E402

# (label, registered name, parameters)
VARIANTS = (
    ("ring_allreduce", "ring_allreduce", {}),
    ("mpi", "mpi", {}),
    ("parameter_server shared", "parameter_server", {"server": "shared"}),
    ("parameter_server dedicated", "parameter_server", {"server": "dedicated"}),
    ("fedavg", "fedavg", {}),
    ("horovod", "horovod", {}),
)
OPTIONAL = {"horovod"}  # skipped where it is not installed


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--model", default="3x16", help="U-Net as DEPTHxBASE_CHANNELS")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="samples per rank and step")
    ap.add_argument("--p2p-mb", type=float, default=32.0, help="buffer size of the bandwidth ping-pong")
    ap.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    ap.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ranks < 2:
        ap.error("the strategies need at least 2 ranks")
    args.depth, args.base = (int(v) for v in args.model.lower().split("x"))
    return args


# ---------------------------------------------------------------------------------------------
# rank side


def _p2p_bandwidth(comm, nbytes: int, iterations: int = 10) -> list[float]:
    """One-way seconds for ``nbytes`` between ranks 0 and 1 (Send/Recv ping-pong); other ranks idle."""
    import numpy as np

    buf = np.zeros(max(1, nbytes // 4), dtype=np.float32)
    times = []
    for i in range(iterations + 2):
        comm.Barrier()
        start = time.perf_counter()
        if comm.rank == 0:
            comm.Send(buf, dest=1)
            comm.Recv(buf, source=1)
        elif comm.rank == 1:
            comm.Recv(buf, source=0)
            comm.Send(buf, dest=0)
        if i >= 2:
            times.append((time.perf_counter() - start) / 2)
    return times


def _flat_allreduce(comm, numel: int, iterations: int) -> dict[str, list[float]]:
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    flat = torch.zeros(numel, dtype=torch.float32)
    out = {"gloo": [], "mpi": []}
    for i in range(iterations + 2):
        for name in out:
            comm.Barrier()
            start = time.perf_counter()
            if name == "gloo":
                dist.all_reduce(flat)
            else:
                comm.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM)
            if i >= 2:
                out[name].append(time.perf_counter() - start)
    return out


def _world(comm_name: str, worlds: dict):
    from autocnnp.core.errors import Location
    from autocnnp.engine.values import bind
    from autocnnp.generator.points import registry

    if comm_name not in worlds:
        entry = registry("communication_init").get(comm_name, Location(Path("benchmark"), 0, 0))
        config = bind(entry.config, [], Path("."), comm_name)
        worlds[comm_name] = entry.load()(*([config] if config is not None else []), timeout_s=300)
    return worlds[comm_name]


def _run_strategy(name: str, params: dict, args, worlds: dict, comm) -> dict:
    import torch
    import torch.nn.functional as F

    from autocnnp.components.architectures.unet import UNet
    from autocnnp.core.errors import Location
    from autocnnp.generator.points import registry

    entry = registry("dist_strategy").get(name, Location(Path("benchmark"), 0, 0))
    inits = entry.requires.get("communication_init", ("torch_distributed",))
    world = _world(inits[0], worlds)
    strategy = entry.load()(entry.config(**params), world=world, device=torch.device("cpu"))

    torch.manual_seed(0)
    net = UNet(4, 4, depth=args.depth, base_channels=args.base, norm="batch")
    numel = sum(p.numel() for p in net.parameters() if p.requires_grad)
    model = strategy.wrap(net)
    optimizer = strategy.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), model)
    per_round = args.warmup + args.steps
    sampler = strategy.sampler(list(range(per_round * args.batch * comm.size)), shuffle=False, seed=0)
    trains = next(iter(sampler), None) is not None  # a dedicated server's sampler yields nothing
    gen = torch.Generator().manual_seed(comm.rank)
    x = torch.randn(args.batch, 4, 32, 32, generator=gen)
    y = torch.randint(0, 4, (args.batch, 32, 32), generator=gen)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # a no-op scaler, as the trainer's in fp32
    steps, comms = [], []
    rounds = []
    for epoch, count in enumerate((args.warmup, args.steps)):
        comm.Barrier()
        if trains:
            model.train()
            for _ in range(count):
                t0 = time.perf_counter()
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                t1 = time.perf_counter()
                strategy.after_backward(model)
                t2 = time.perf_counter()
                strategy.step(optimizer, scaler)
                t3 = time.perf_counter()
                if epoch == 1:
                    steps.append(t3 - t0)
                    comms.append({"mpi": t2 - t1, "parameter_server": t3 - t2}.get(name, 0.0))
        t0 = time.perf_counter()
        strategy.end_epoch(model)
        if epoch == 1:
            rounds.append(time.perf_counter() - t0)
    return {"params": numel, "trains": trains, "steps": steps, "comm": comms, "round": rounds[0],
            "rank": comm.rank}


def worker(args) -> int:
    import torch
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    torch.set_num_threads(max(1, torch.get_num_threads() // comm.size))
    worlds: dict = {}
    _world("torch_distributed", worlds)
    _world("mpi4py", worlds)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    p2p = _p2p_bandwidth(comm, int(args.p2p_mb * 2**20))
    results, skipped = {}, {}
    for label, name, params in VARIANTS:
        if only and label not in only:
            continue
        try:
            results[label] = _run_strategy(name, params, args, worlds, comm)
        except Exception as exc:  # noqa: BLE001 -- an optional strategy not installed here: the same on every rank
            if label not in OPTIONAL:
                raise
            skipped[label] = str(exc).splitlines()[0]
    numel = next(iter(results.values()))["params"] if results else 0
    flat = _flat_allreduce(comm, numel, args.steps) if numel else {}
    p2p += _p2p_bandwidth(comm, int(args.p2p_mb * 2**20))
    gathered = comm.gather(results, root=0)
    if comm.rank == 0:
        out = {"ranks": comm.size, "threads": torch.get_num_threads(), "p2p": p2p,
               "p2p_bytes": int(args.p2p_mb * 2**20), "flat": flat, "per_rank": gathered, "skipped": skipped}
        (Path(args.worker) / "result.json").write_text(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------------------------
# launcher side


def _slowest(per_rank: list[dict], label: str, key: str) -> list[float]:
    """Per step, the slowest training rank's value."""
    series = [r[label][key] for r in per_rank if r[label]["trains"]]
    return [max(vals) for vals in zip(*series)]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    res = ranks_result(Path(__file__).resolve(), args.ranks, argv if argv is not None else sys.argv[1:],
                       "mpirun", "strategies")
    if res is None:
        return 0

    n = res["ranks"]
    per_rank = res["per_rank"]
    labels = list(per_rank[0])
    if not labels:
        print("strategies: nothing ran", res["skipped"])
        return 0
    s = per_rank[0][labels[0]]["params"] * 4
    bandwidth = res["p2p_bytes"] / statistics.median(res["p2p"])
    bound = 2 * (n - 1) / n * s / bandwidth
    ring_bytes = 2 * (n - 1) / n * s
    print(f"dist_strategy benchmark: {n} ranks, U-Net {args.model} ({s / 4:.0f} parameters, S = {s / 2**20:.2f} MiB), "
          f"batch {args.batch}/rank, {res['threads']} thread(s)/rank, {args.steps} timed steps after {args.warmup}")
    print(f"point-to-point B = {bandwidth / 1e9:.2f} GB/s (mpi4py Send/Recv of {res['p2p_bytes'] / 2**20:.0f} MiB, "
          f"ranks 0<->1, median); ring bound 2(N-1)/N x S / B = {bound * 1e3:.3f} ms")
    rows = []
    for label in labels:
        steps = _slowest(per_rank, label, "steps")
        step = statistics.median(steps)
        workers = sum(1 for r in per_rank if r[label]["trains"])
        if label.startswith("fedavg"):
            per_round = max(r[label]["round"] for r in per_rank)
            comm_t = per_round / args.steps
            step += comm_t
            moved = ring_bytes / args.steps
        elif label.startswith("parameter_server"):
            comm_t = statistics.median(_slowest(per_rank, label, "comm"))
            moved = 2 * s
        elif label.startswith("mpi"):
            comm_t = statistics.median(_slowest(per_rank, label, "comm"))
            moved = ring_bytes
        else:  # DDP, Horovod: allreduce overlapped with backward, not separable (see the flat rows)
            rows.append((label, f"{workers}", f"{step * 1e3:.2f}", "overlapped", f"{ring_bytes / 2**20:.3f}", ""))
            continue
        rows.append((label, f"{workers}", f"{step * 1e3:.2f}", f"{comm_t * 1e3:.3f}", f"{moved / 2**20:.3f}",
                     f"{comm_t / bound:.2f}"))
    for name in ("gloo", "mpi"):
        if res["flat"]:
            t = statistics.median(res["flat"][name])
            rows.append((f"flat allreduce of S ({name})", "", "", f"{t * 1e3:.3f}", f"{ring_bytes / 2**20:.3f}",
                         f"{t / bound:.2f}"))
    print(table(("strategy", "workers", "step ms", "comm ms", "MiB/step/rank", "vs ring bound"), rows))
    print("comm: mpi = after_backward; parameter_server = optimizer.step() push/pull at a worker (the server's "
          "averaging and update included); fedavg = the round's model average / steps per round; ring_allreduce, "
          "horovod: overlapped with backward (the flat rows time an allreduce of S alone). vs ring bound = comm ms / "
          "(2(N-1)/N x S / B). MiB/step/rank: parameter_server counts a worker's 2 S; the server moves 2 S per worker")
    for label, why in res["skipped"].items():
        print(f"skipped {label}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
