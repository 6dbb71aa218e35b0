"""3D patch loader vs 3D training: can the volume cache and the 3D augmentation feed a rank faster than it trains?

    python benchmarks/patch_loader.py [--cases 8] [--shape 120 120 78] [--patch 32 64 64] [--batch 2] [--workers 0,2]

One rank's view, in one process, with the threads one of ``--ranks`` ranks gets:

* pipeline: patches/s that the trainer's loader delivers (``PatchDataset`` over the memory-mapped volume cache
  of a synthetic 4-channel brain dataset written for the run -- cache built once, not timed -- read a minibatch
  at a time by ``batch_loader``, then ``DeviceBatches`` with ``RandomAffine3D``: rotation, zoom, flips,
  intensity, gamma), for each ``--workers``;
* training: patches/s one rank's step consumes (forward, backward, SGD step of a 3D U-Net on a batch already
  there: no loading, no allreduce, so the ratio is a lower bound);
* memory: the rank's private memory (RssAnon) while it reads patches, against the cache's size: the volumes are
  memory-mapped, so a rank holds its patches, not the dataset.

The ratio pipeline / training should be >= 3. Rounds alternate pipeline and training; medians. Figures, not
asserts: exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import table  # noqa: E402

TARGET = 3.0


def private_mib() -> float:
    """This process' private resident memory (RssAnon) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pipeline_rate(dataset, augment, batch: int, workers: int, batches: int) -> tuple[float, float]:
    """Patches/s delivered on the CPU from the second batch on, and the peak private memory seen (MiB)."""
    from autocnnp.data.batches import DeviceBatches, EpochIndices, batch_loader

    order = EpochIndices(torch.randperm(len(dataset)).tolist(), len(dataset))
    loader = DeviceBatches(batch_loader(dataset, order, batch, drop_last=True, workers=workers), torch.device("cpu"),
                           augment, False)
    peak, start, seen = private_mib(), None, 0
    for k, (x, _) in enumerate(loader):
        if k == 0:
            start = time.perf_counter()
        else:
            seen += len(x)
        peak = max(peak, private_mib())
        if k >= batches:
            break
    return seen / (time.perf_counter() - start), peak


def training_rate(net, in_channels: int, classes: int, patch, batch: int, steps: int) -> float:
    x = torch.randn(batch, in_channels, *patch)
    y = torch.randint(0, classes, (batch, *patch))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    for k in range(steps + 1):
        if k == 1:
            start = time.perf_counter()
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--shape", type=int, nargs=3, default=[120, 120, 78], help="X Y Z of the written volumes")
    ap.add_argument("--patch", type=int, nargs=3, default=[32, 64, 64], help="D H W")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--ranks", type=int, default=2, help="ranks per node: each gets the threads / ranks")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()

    from autocnnp.components.architectures.unet3d import Config, build
    from autocnnp.core.processes import default_threads
    from autocnnp.data.augment import RandomAffine3D
    from autocnnp.data.synth import write_synthetic_dataset
    from autocnnp.data.volumes3d import PatchDataset, build_volume_cache

    torch.set_num_threads(default_threads(args.ranks))
    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic_dataset(Path(tmp) / "data", "brain", cases=args.cases, shape=tuple(args.shape),
                                       test_cases=0)
        built = time.perf_counter()
        cache = build_volume_cache(data, Path(tmp) / "cache", target_spacing=(1.0, 1.0, 1.5), normalise=True)
        built = time.perf_counter() - built
        cache_mib = sum(f.stat().st_size for f in cache.iterdir() if f.is_file()) / 2**20
        dataset = PatchDataset(cache, patch=args.patch, length=16 * args.cases, foreground_share=0.33, seed=0)
        augment = RandomAffine3D(seed=0, flips=True, intensity=0.1, gamma=0.3)
        net = build(Config(depth=3, base_channels=16), in_channels=4, num_classes=4)
        workers = [int(w) for w in args.workers.split(",")]
        rates: dict[int, list[float]] = {w: [] for w in workers}
        peaks: dict[int, float] = {w: 0.0 for w in workers}
        trained: list[float] = []
        batches, idle = 8, private_mib()  # idle: torch, the network and the dataset's index, before any patch
        for _ in range(args.rounds):
            for w in workers:
                rate, peak = pipeline_rate(dataset, augment, args.batch, w, batches)
                rates[w].append(rate)
                peaks[w] = max(peaks[w], peak)
            trained.append(training_rate(net, 4, 4, args.patch, args.batch, args.steps))
        train = statistics.median(trained)
        print(f"{args.cases} cases {'x'.join(map(str, args.shape))} x 4 channels, volume cache {cache_mib:.0f} MiB "
              f"(built in {built:.1f} s), patch {'x'.join(map(str, args.patch))}, batch {args.batch}, "
              f"{torch.get_num_threads()} thread(s); training (unet3d depth 3, 16 channels): {train:.2f} patches/s; "
              f"rank private memory before reading: {idle:.0f} MiB")
        rows = [[str(w), f"{statistics.median(rates[w]):.1f}", f"{statistics.median(rates[w]) / train:.1f}x",
                 "yes" if statistics.median(rates[w]) / train >= TARGET else "NO", f"{peaks[w]:.0f}"] for w in workers]
        print(table(["workers", "loader patches/s", "loader / training", f">= {TARGET:g}x", "rank private MiB"],
                    rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
