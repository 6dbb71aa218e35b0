"""Input pipeline vs training: can the loader feed a rank faster than the rank trains?

    python benchmarks/input_pipeline.py [--workers 0,2] [--rounds 3] [--batch 4] [--size 64]
    python benchmarks/input_pipeline.py --device cuda --precision bf16 --channels-last   (a GPU machine)

One rank's view, in one process on this machine, with the threads one of ``--ranks`` ranks gets
(the trainer's rule: the machine's threads divided by the ranks on the node):

* pipeline: samples/s the trainer's loader delivers on the training device, for ``w`` in
  ``--workers`` (the job's ``loader_workers``), over
  - ``synthetic``: ``<data format="synthetic">`` (in memory, no augmentation -- as the job uses it);
  - ``decathlon``: ``<data format="decathlon">`` on a small synthetic Decathlon dataset written for the
    run (NIfTI, cached to 2D slices once -- not timed), read from the memory-mapped cache with the
    thesis Table 2.1 augmentation (rotation, zoom, shifts) plus flips and intensity changes;
  - ``decathlon-read``: the same without augmentation: on a GPU machine the CPU's whole share of the
    batched path (read, pin, copy), since the augmentation then runs on the GPU;
  each through ``batched`` (what the trainer does: ``data.batches.batch_loader`` reads a minibatch in
  one go, ``DeviceBatches`` moves it to the device and augments the batch there) and ``per-sample``
  (what it did before: ``DataLoader`` over the items, each augmented alone on the CPU in the loader,
  collated, then moved); timed from the second batch on (worker start-up excluded), several epochs;
* training: samples/s that one rank's training step consumes: forward, backward and SGD step of
  the benchmark's U-Net on a batch already on the device (no data loading, no allreduce: the fastest
  the rank could eat, so the ratio is a lower bound).

The ratio pipeline / training must be >= 3 for the batched path (the loader then costs a rank at
most a quarter of a step). Measurements alternate pipeline / training over ``--rounds`` rounds;
medians. Figures, not asserts: exits 0. ``--device cuda`` measures both sides on a GPU (defaults then:
256 x 256 slices, U-Net 4x32, batch 16).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import table  # noqa: E402

from autocnnp.training.precision import AUTOCAST_DTYPES  # noqa: E402

TARGET = 3.0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--ranks", type=int, default=2, help="ranks per node the threads are shared by")
    ap.add_argument("--workers", default="0,2", help="DataLoader worker counts, comma-separated")
    ap.add_argument("--size", type=int, help="slice size (default 64 on cpu, 256 on cuda)")
    ap.add_argument("--depth", type=int, help="U-Net depth (default 3 on cpu, 4 on cuda)")
    ap.add_argument("--base-channels", type=int, help="U-Net base channels (default 16 on cpu, 32 on cuda)")
    ap.add_argument("--batch", type=int, help="per-rank minibatch (default 4 on cpu, 16 on cuda)")
    ap.add_argument("--samples", type=int, default=128, help="samples per pipeline epoch")
    ap.add_argument("--epochs", type=int, default=2, help="pipeline epochs per measurement")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    for name, cpu, cuda in (("size", 64, 256), ("depth", 3, 4), ("base_channels", 16, 32), ("batch", 4, 16)):
        if getattr(args, name) is None:
            setattr(args, name, cuda if gpu else cpu)
    args.worker_list = [int(w) for w in args.workers.split(",") if w.strip()]
    return args


class PerSample(torch.utils.data.Dataset):
    """The loader before: every item read and augmented alone on the CPU (``RandomAffine2D`` per item)."""

    def __init__(self, dataset, augment):
        self.dataset, self.augment = dataset, augment

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return self.augment(image, label, epoch=0, index=i) if self.augment else (image, label)


def datasets(args, folder: Path) -> dict:
    """name -> (training dataset, its batch augmentation), as the job's data formats build them."""
    from autocnnp.components.datasets import decathlon, synthetic
    from autocnnp.core.world import World
    from autocnnp.data.synth import write_synthetic_dataset

    syn = synthetic.Synthetic(synthetic.Config(kind="brain", train_samples=args.samples, valid_samples=4,
                                               size=args.size)).datasets(world=World(), seed=0,
                                                                         cache_dir=folder / "cache")
    depth = max(8, args.samples // 4)
    root = write_synthetic_dataset(folder / "brain", "brain", cases=5, shape=(args.size, args.size, depth), seed=0,
                                   test_cases=0)
    start = time.perf_counter()
    config = decathlon.Config(train=root, slices_per_volume=depth, slice_mode="even", size=args.size,
                              valid_fraction=0.2, augment=True, augment_flips=True, augment_intensity=0.1)
    dec = decathlon.Decathlon(config).datasets(world=World(), seed=0, cache_dir=folder / "cache")
    return {"synthetic": (syn.train, syn.augment), "decathlon": (dec.train, dec.augment),
            "decathlon-read": (dec.train, None),
            "_cache_s": time.perf_counter() - start, "_slices": 5 * depth}


def loader(ds, augment, args, device, workers: int, batched: bool):
    """The trainer's loader (``batched``) or the per-sample one it replaced, yielding device batches."""
    from torch.utils.data import DataLoader, RandomSampler

    from autocnnp.data.batches import DeviceBatches, batch_loader

    order = RandomSampler(ds, generator=torch.Generator().manual_seed(0))
    pin = device.type == "cuda"
    if batched:
        return _epochs(DeviceBatches(batch_loader(ds, order, args.batch, drop_last=True, workers=workers,
                                                  pin_memory=pin), device, augment, args.channels_last), args)
    plain = DataLoader(PerSample(ds, augment), batch_size=args.batch, sampler=order, drop_last=True,  # item by item
                       num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)
    return ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in _epochs(plain, args))


def _epochs(batches, args):
    for _ in range(args.epochs):
        yield from batches


def pipeline_rate(batches, args, device) -> float:
    """Samples/s a loader delivers on the device, from its second batch on."""
    count, start = 0, None
    for x, _ in batches:
        if start is None:
            start = time.perf_counter()
            continue
        count += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - start)


def training_rate(args, net, optimizer, batch) -> float:
    """Samples/s one rank's forward + backward + SGD step consumes (data already in memory)."""
    import torch.nn.functional as F

    x, y = batch
    device = x.device
    dtype = AUTOCAST_DTYPES[args.precision]

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    return args.steps * len(x) / (time.perf_counter() - start)


def main(argv=None) -> int:
    args = parse_args(argv)
    from autocnnp.components.architectures.unet import UNet
    from autocnnp.data.batches import BatchReader

    threads = max(1, torch.get_num_threads() // max(1, args.ranks))
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    folder = Path(tempfile.mkdtemp(prefix="autocnnp-pipeline-"))
    try:
        data = datasets(args, folder)
        cache_s, raw_slices = data.pop("_cache_s"), data.pop("_slices")
        torch.manual_seed(0)
        net = UNet(4, 4, depth=args.depth, base_channels=args.base_channels, norm="batch").to(device)
        x, y, _ = BatchReader(data["synthetic"][0])[np.arange(args.batch)]
        x, y = x.float().to(device), y.long().to(device)
        if args.channels_last:
            net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        pipe: dict[tuple[str, str, int], list[float]] = {}
        train: list[float] = []
        for _ in range(args.rounds):
            for name, (ds, augment) in data.items():
                for w in args.worker_list:
                    for path in ("batched", "per-sample"):
                        batches = loader(ds, augment, args, device, w, path == "batched")
                        pipe.setdefault((name, path, w), []).append(pipeline_rate(batches, args, device))
                        del batches
                    train.append(training_rate(args, net, optimizer, (x, y)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    consume = statistics.median(train)
    print(f"input pipeline vs training: one rank of {args.ranks} ({threads} thread(s)), batch {args.batch}, "
          f"{args.size}x{args.size} brain slices (4 ch); training: U-Net {args.depth}x{args.base_channels} on "
          f"{args.device} ({args.precision}{', channels_last' if args.channels_last else ''})")
    print(f"training consumes {consume:.1f} samples/s per rank (median of {len(train)}, "
          f"{min(train):.1f}-{max(train):.1f}); decathlon slice cache built once in {cache_s:.1f} s (not timed, "
          f"{raw_slices} slices)")
    rows, lowest = [], {}
    for (name, path, w), rates in pipe.items():
        rate = statistics.median(rates)
        ratio = rate / consume
        lowest[path] = min(lowest.get(path, ratio), ratio)
        before = statistics.median(pipe[(name, "per-sample", w)])
        rows.append((name, path, str(w), f"{rate:.1f}", f"{min(rates):.1f}-{max(rates):.1f}", f"{ratio:.1f}",
                     f"{rate / before:.1f}", "ok" if ratio >= TARGET else "BELOW"))
    print(table(("dataset", "loader", "workers", "samples/s", "range", "pipeline / training", "vs per-sample",
                 f">= {TARGET:g}"), rows))
    print(f"lowest ratio: batched {lowest['batched']:.1f}, per-sample {lowest['per-sample']:.1f} (target >= {TARGET:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
