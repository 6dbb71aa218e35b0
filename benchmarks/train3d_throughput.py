"""3D training throughput: ``autocnnp run``'s step loop on 3D patches vs a minimal hand-written torch DDP loop.

    python benchmarks/train3d_throughput.py [--rounds 3] [--warmup 3] [--steps 10] [--ranks 2]

The 3D counterpart of ``train_throughput.py`` (whose rank-side framework run and rate computation it reuses):
both sides train the same ``unet3d`` on the same patches of the same ``autocnnp synth --kind tubes`` dataset,
read from the volume cache that ``<data format="decathlon">`` with ``dimension=3d`` builds (the framework run
builds it, content-keyed; the hand loop reads the very same cache through the data format's bundle), with the
same per-rank batch, patch, augmentation (the format's ``RandomAffine3D`` applied to each batch on the device),
optimizer (SGD, momentum 0.9), loss (voxel cross-entropy), threads per rank and process group, in the same
processes, alternating framework / hand rounds. Only training steps are timed (the first ``--warmup`` of each
run are dropped; whole-volume validation and checkpoints fall outside). Goal: ratio framework / hand >= 0.95.
Figures, not asserts: exits 0.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import init_process_group, ranks_result, table  # noqa: E402
from train_throughput import JOB, framework_run  # noqa: E402

TARGET = 0.95

CASES, TRAIN_CASES = 5, 4  # valid_fraction 0.2 holds one out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--base-channels", type=int, default=8)
    ap.add_argument("--patch", default="16,32,32", help="D,H,W")
    ap.add_argument("--batch", type=int, default=2, help="per-rank minibatch")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--launcher", choices=("auto", "mpirun", "torchrun"), default="auto")
    ap.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def hand_run(args, world, job: Path, threads: int) -> list[tuple[float, float]]:
    """DDP over the same network, reading the same patches (the format's bundle: its cache, its augmentation)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler

    from autocnnp.run.job import load_job

    torch.set_num_threads(max(1, threads // max(1, world.local_world_size)))
    init_process_group("gloo", world)
    gen = load_job(job).generator
    data = gen.data_format().datasets(world=world, seed=0, cache_dir=job.parent / "cache")
    torch.manual_seed(0)
    model = DistributedDataParallel(gen.action("architecture_injection").build(in_channels=data.in_channels,
                                                                              num_classes=data.num_classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sampler = DistributedSampler(range(len(data.train)), num_replicas=world.world_size, rank=world.rank, seed=0)
    order = list(sampler)
    stamps: list[tuple[float, float]] = []
    model.train()
    for lo in range(0, len(order) - args.batch + 1, args.batch):
        indices = order[lo:lo + args.batch]
        x, y = data.train.read_batch(indices)
        x, y = x.float(), y.long()
        if data.augment is not None:
            x, y = data.augment.batch(x, y, epoch=0, indices=indices)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()
        stamps.append((time.perf_counter(), time.process_time()))
    return stamps


def worker(args) -> int:
    import torch

    from autocnnp.core.world import discover_world

    world = discover_world()
    folder = Path(args.worker)
    threads = torch.get_num_threads()
    runs = []
    for r in range(args.rounds):
        for mode in ("framework", "hand"):
            torch.set_num_threads(threads)
            stamps = (framework_run(args, folder / "job.xml", folder / f"framework{r}") if mode == "framework"
                      else hand_run(args, world, folder / "job.xml", threads))
            runs.append({"round": r, "mode": mode, "stamps": stamps})
    if world.rank == 0:
        (folder / "result.json").write_text(json.dumps({"runs": runs, "threads": threads}))
    return 0


def rate(args, stamps) -> float:
    """Patches/s (all ranks) from the median interval between step ends after the warm-up."""
    timed = stamps[args.warmup - 1:]
    return args.batch * args.ranks / statistics.median(b[0] - a[0] for a, b in zip(timed, timed[1:]))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    from autocnnp.data.synth import write_synthetic_dataset

    folder = Path(tempfile.mkdtemp(prefix="autocnnp-throughput3d-"))
    try:
        write_synthetic_dataset(folder / "tubes", "tubes", cases=CASES, shape=(48, 48, 24), test_cases=0)
        steps = args.warmup + args.steps
        per_volume = -(-steps * args.batch * args.ranks // TRAIN_CASES)
        (folder / "job.xml").write_text(JOB.format(
            ranks=args.ranks, output="throughput3d", backend="gloo", placement="cpu", batch=args.batch,
            architecture=f'<CNN_archi name="unet3d"><param name="depth">{args.depth}</param>'
                         f'<param name="base_channels">{args.base_channels}</param></CNN_archi>',
            data=f'<data format="decathlon"><train><path>{folder / "tubes"}</path></train>'
                 f'<param name="dimension">3d</param><param name="patch_size">{args.patch}</param>'
                 f'<param name="patches_per_volume">{per_volume}</param><param name="valid_fraction">0.2</param>'
                 f'<param name="cache">{folder / "cache"}</param></data>', hyperparameters=""))
        started = time.perf_counter()
        result = ranks_result(Path(__file__).resolve(), args.ranks, argv if argv is not None else sys.argv[1:],
                              args.launcher, "train3d_throughput", folder)
        if result is None:
            return 0
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    by_round: dict[int, dict[str, float]] = {}
    for run in result["runs"]:
        by_round.setdefault(run["round"], {})[run["mode"]] = rate(args, run["stamps"])
    rows = [(f"round {r + 1}", f"{v['framework']:.2f}", f"{v['hand']:.2f}", f"{v['framework'] / v['hand']:.3f}")
            for r, v in sorted(by_round.items())]
    fw = statistics.median(v["framework"] for v in by_round.values())
    hand = statistics.median(v["hand"] for v in by_round.values())
    rows.append(("median", f"{fw:.2f}", f"{hand:.2f}", f"{fw / hand:.3f}"))
    print(f"3D train throughput: unet3d depth {args.depth}, {args.base_channels} base channels, patch {args.patch}, "
          f"batch {args.batch}/rank x {args.ranks} ranks (cpu, gloo, {max(1, result['threads'] // args.ranks)} "
          f"threads/rank); {args.warmup} warm-up + {args.steps} timed steps, {args.rounds} rounds; {wall:.0f} s")
    print(table(("", "framework patches/s", "hand DDP patches/s", "ratio"), rows))
    print(f"ratio framework / hand: {fw / hand:.3f}; target >= {TARGET}: {'ok' if fw / hand >= TARGET else 'BELOW'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
