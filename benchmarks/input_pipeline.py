"""Input pipeline vs training: can the DataLoader feed a rank faster than the rank trains?

    python benchmarks/input_pipeline.py [--workers 0,2] [--rounds 3] [--batch 4] [--size 64]

One rank's view, in one process on this machine, with the threads one of ``--ranks`` ranks gets
(the trainer's rule: the machine's threads divided by the ranks on the node):

* pipeline: samples/s that ``DataLoader(dataset, batch_size, shuffle, drop_last, num_workers=w)``
  delivers, for ``w`` in ``--workers`` (the job's ``loader_workers``), over
  - ``synthetic``: the dataset ``<data format="synthetic">`` builds (``SyntheticSliceDataset``,
    generated on demand, no augmentation -- as the job uses it);
  - ``synthetic+aug``: the same with the Decathlon path's augmentation (``RandomAffine2D``);
  - ``decathlon``: ``<data format="decathlon">`` on a small synthetic Decathlon dataset written
    for the run (NIfTI, cached to 2D slices once -- not timed -- then ``CacheDataset`` over the
    memory-mapped cache with ``RandomAffine2D`` augmentation, thesis Table 2.1);
  timed from the second batch on (worker start-up excluded), several epochs;
* training: samples/s that one rank's training step consumes: forward, backward and SGD step of
  the benchmark's U-Net on a batch already in memory (no data loading, no allreduce: the fastest
  the rank could eat, so the ratio is a lower bound).

The ratio pipeline / training must be >= 3 (the loader then costs a rank at most a quarter of a
step with ``loader_workers`` 0, and workers keep up with room to spare). Measurements alternate
pipeline / training over ``--rounds`` rounds; medians. Figures, not asserts: exits 0.
``--device cuda [--precision bf16 --channels-last]`` measures the training side on a GPU instead
(defaults then: 256 x 256 slices, U-Net 4x32, batch 16).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import table  # noqa: E402

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


def datasets(args, folder: Path) -> dict:
    """name -> training dataset, as the job's dataset components build them."""
    from autocnnp.components.datasets import decathlon, synthetic
    from autocnnp.core.world import World
    from autocnnp.data.augment import RandomAffine2D
    from autocnnp.data.synth import write_synthetic_dataset
    from autocnnp.data.synthetic_slices import SyntheticSliceDataset

    syn = synthetic.Synthetic(synthetic.Config(kind="brain", train_samples=args.samples, valid_samples=4,
                                               size=args.size)).datasets(world=World(), seed=0,
                                                                         cache_dir=folder / "cache").train
    aug = SyntheticSliceDataset("brain", args.samples, args.size, 4, 4, seed=0, in_memory=False,
                                augment=RandomAffine2D(decathlon.AUGMENT_ROTATION, decathlon.AUGMENT_ZOOM,
                                                       decathlon.AUGMENT_TRANSLATE, seed=0))
    depth = max(8, args.samples // 4)
    root = write_synthetic_dataset(folder / "brain", "brain", cases=5, shape=(args.size, args.size, depth), seed=0,
                                   test_cases=0)
    start = time.perf_counter()
    config = decathlon.Config(train=root, slices_per_volume=depth, slice_mode="even", size=args.size,
                              valid_fraction=0.2, augment=True)
    dec = decathlon.Decathlon(config).datasets(world=World(), seed=0, cache_dir=folder / "cache").train
    cache_s = time.perf_counter() - start
    return {"synthetic": syn, "synthetic+aug": aug, "decathlon": dec, "_cache_s": cache_s, "_slices": 5 * depth}


def pipeline_rate(ds, args, workers: int) -> float:
    """Samples/s the DataLoader delivers, from its second batch on."""
    from torch.utils.data import DataLoader

    loader = DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0)
    count, start = 0, None
    for epoch in range(args.epochs):
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)  # in the main process only: workers keep their copy (fine for timing)
        for x, _ in loader:
            if start is None:
                start = time.perf_counter()
                continue
            count += len(x)
    rate = count / (time.perf_counter() - start)
    del loader
    return rate


def training_rate(args, net, optimizer, batch) -> float:
    """Samples/s one rank's forward + backward + SGD step consumes (data already in memory)."""
    import torch
    import torch.nn.functional as F

    x, y = batch
    device = x.device
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

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
    import torch

    from autocnnp.components.architectures.unet import UNet

    threads = max(1, torch.get_num_threads() // max(1, args.ranks))
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    folder = Path(tempfile.mkdtemp(prefix="autocnnp-pipeline-"))
    try:
        data = datasets(args, folder)
        cache_s, raw_slices = data.pop("_cache_s"), data.pop("_slices")
        torch.manual_seed(0)
        net = UNet(4, 4, depth=args.depth, base_channels=args.base_channels, norm="batch").to(device)
        x = torch.stack([data["synthetic"][i][0] for i in range(args.batch)]).to(device)
        y = torch.stack([data["synthetic"][i][1] for i in range(args.batch)]).to(device)
        if args.channels_last:
            net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        pipe: dict[tuple[str, int], list[float]] = {}
        train: list[float] = []
        for _ in range(args.rounds):
            for name, ds in data.items():
                for w in args.worker_list:
                    pipe.setdefault((name, w), []).append(pipeline_rate(ds, args, w))
                    train.append(training_rate(args, net, optimizer, (x, y)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    consume = statistics.median(train)
    print(f"input pipeline vs training: one rank of {args.ranks} ({threads} thread(s)), batch {args.batch}, "
          f"{args.size}x{args.size} brain slices (4 ch); training: U-Net {args.depth}x{args.base_channels} on "
          f"{args.device} ({args.precision}{', channels_last' if args.channels_last else ''})")
    print(f"training consumes {consume:.1f} samples/s per rank (median of {len(train)}, "
          f"{min(train):.1f}-{max(train):.1f}); decathlon slice cache built once in {cache_s:.1f} s (not timed)")
    print(f"raw NIfTI -> cache (validate, decode, slice, resize, z-score, write): {raw_slices} slices, "
          f"{raw_slices / cache_s:.1f} slices/s; from the cache: see the decathlon rows")
    rows = []
    worst = None
    for (name, w), rates in pipe.items():
        rate = statistics.median(rates)
        ratio = rate / consume
        worst = ratio if worst is None else min(worst, ratio)
        rows.append((name, str(w), f"{rate:.1f}", f"{min(rates):.1f}-{max(rates):.1f}", f"{ratio:.1f}",
                     "ok" if ratio >= TARGET else "BELOW"))
    print(table(("dataset", "workers", "samples/s", "range", "pipeline / training", f">= {TARGET:g}"), rows))
    print(f"lowest ratio: {worst:.1f} (target >= {TARGET:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
