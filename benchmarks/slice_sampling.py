"""Slice sampling vs generalisation: does the validation Dice of a slice-sampled job predict the Dice on
whole held-out volumes?

    python benchmarks/slice_sampling.py [--cases 16] [--valid 3] [--test 4] [--slices 16] [--epochs 25] [--seeds 3]

Writes a synthetic left-atrium dataset (``autocnnp.data.synth``, Decathlon layout; the label is a thin
shell around a bright blood pool and holds ~45 % of the slices whatever the shape, as its radii scale
with the volume) and splits its labelled cases, in index order, into training, validation and held-out
test cases. The generator leaves the unlabelled slices as plain noise, which no model mistakes for the
atrium, so by default an unlabelled "ventricle" (see :func:`add_distractors`) is painted into them, as
real scans show other chambers there (``--no-distractors``: as written). For each sampling setup --
``even``, ``labelled`` and ``mixed`` with each of ``--fractions`` (the share of the slices taken among
those holding a label), all with ``--slices`` slices per volume -- it builds the training cache with
``build_cache(..., case_indices=train)``, trains a small 2D U-Net (``--depth`` x ``--base-channels``,
``dice_ce`` loss, Adam, no augmentation, ``--threads`` threads) for ``--epochs`` epochs with each of
``--seeds`` training seeds and reports the mean foreground Dice (class 1, confusion counts pooled over
all slices of all volumes) of:

* (a) ``valid sampled``: the validation cases' slices picked with the same setup (how a job scored
  validation);
* (b) ``valid whole``: every slice of the validation volumes;
* (c) ``test whole``: every slice of the held-out test volumes (the truth), and its worst seed;

and the gaps (a)-(c) and (b)-(c). ``fg share`` is the share of training slices that hold a label.
Per-seed (c) figures go to stderr. Figures, not asserts: exits 0.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import table  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=16, help="labelled cases written")
    ap.add_argument("--valid", type=int, default=3, help="of them, validation cases")
    ap.add_argument("--test", type=int, default=4, help="of them, held-out test cases (the last ones)")
    ap.add_argument("--shape", type=int, nargs=3, default=[44, 52, 40], metavar=("X", "Y", "Z"))
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                    help="slice size (default: X Y, no resizing; multiples of 2^(depth-1))")
    ap.add_argument("--slices", type=int, default=16, help="slices per training volume")
    ap.add_argument("--fractions", default="0.33,0.5,0.67", help="foreground fractions of mode mixed, comma-separated")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--depth", type=int, default=3, help="U-Net depth")
    ap.add_argument("--base-channels", type=int, default=8, help="U-Net base channels")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed, and first training seed")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per setup (figures are their means)")
    ap.add_argument("--no-distractors", action="store_true",
                    help="leave the unlabelled slices as the generator writes them (noise only)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.cases - args.valid - args.test < 1 or args.valid < 1 or args.test < 1:
        ap.error("need at least one training, one validation and one test case")
    args.size = tuple(args.size or args.shape[:2])
    args.setups = [("even", 0.5), ("labelled", 0.5)] + [("mixed", float(f)) for f in args.fractions.split(",") if f.strip()]
    return args


def add_distractors(root: Path, seed: int) -> None:
    """Paint an unlabelled "ventricle" into the slices of every training image that hold no label.

    The synthetic atrium's unlabelled slices hold only noise, which no model mistakes for the wall; real
    scans show other chambers and vessels there. The distractor is a bright pool (as the atrium's) in a
    3-voxel ring of darker muscle (0.45 against the wall's 0.60 and the background's 0.30, same 8 %
    noise), the same ellipse in every unlabelled slice of a case, placed at random per case.
    """
    import nibabel as nib

    from autocnnp.data.index import read_dataset

    for i, case in enumerate(read_dataset(root).cases("training")):
        rng = np.random.default_rng([seed, 1000 + i])
        img = nib.load(str(case.image))
        data = np.asarray(img.dataobj, dtype=np.float32)
        empty = ~np.asarray(nib.load(str(case.label)).dataobj).any(axis=(0, 1))
        dims = np.array(data.shape[:2], dtype=np.float64)
        centre = dims / 2 + rng.uniform(-0.15, 0.15, 2) * dims
        radii = dims * rng.uniform(0.10, 0.16, 2)
        x, y = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in data.shape[:2]), indexing="ij")
        pool = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 < 1
        muscle = ((x - centre[0]) / (radii[0] + 3)) ** 2 + ((y - centre[1]) / (radii[1] + 3)) ** 2 < 1
        mean = np.where(pool, 1.0, np.where(muscle, 0.45, 0.0))[..., None]
        scale = np.median(data) / 0.30  # the case's intensity scale (background dominates)
        noisy = mean * scale * (1 + 0.08 * rng.standard_normal(data.shape))
        data = np.where((mean > 0) & empty, noisy, data).astype(np.float32)
        nib.save(nib.Nifti1Image(data, img.affine, img.header), str(case.image))


def load(cache: Path):
    """The slices of a cache as tensors ``[N, C, H, W]`` and ``[N, H, W]``."""
    import torch

    images = torch.from_numpy(np.load(cache / "images.npy")).float()  # the cache may hold float16
    return images, torch.from_numpy(np.load(cache / "labels.npy").astype(np.int64))


def train(images, labels, args, seed: int):
    """A U-Net trained on the slices for ``args.epochs`` epochs (initialisation and order seeded by ``seed``)."""
    import torch

    from autocnnp.components.architectures.unet import UNet
    from autocnnp.training.losses import dice_ce

    torch.manual_seed(seed)
    net = UNet(images.shape[1], 2, depth=args.depth, base_channels=args.base_channels, norm="batch")
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(args.epochs):
        for batch in torch.randperm(len(images), generator=order).split(args.batch):
            if len(batch) < 2:  # batch norm needs two samples
                continue
            opt.zero_grad()
            dice_ce(net(images[batch]), labels[batch]).backward()
            opt.step()
    return net.eval()


def foreground_dice(net, images, labels, batch: int = 32) -> float:
    """Dice of class 1 with the confusion counts pooled over all the slices (1.0 when both are empty)."""
    import torch

    tp = fp = fn = 0
    with torch.no_grad():
        for x, y in zip(images.split(batch), labels.split(batch)):
            pred = net(x).argmax(1) == 1
            truth = y == 1
            tp += int((pred & truth).sum())
            fp += int((pred & ~truth).sum())
            fn += int((~pred & truth).sum())
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from autocnnp.data.preprocess import build_cache
    from autocnnp.data.synth import write_synthetic_dataset

    torch.set_num_threads(args.threads)
    n_train = args.cases - args.valid - args.test
    train_ids = list(range(n_train))
    valid_ids = list(range(n_train, n_train + args.valid))
    test_ids = list(range(n_train + args.valid, args.cases))
    folder = Path(tempfile.mkdtemp(prefix="autocnnp-slice-sampling-"))
    try:
        start = time.perf_counter()
        root = write_synthetic_dataset(folder / "atrium", "atrium", cases=args.cases, shape=tuple(args.shape),
                                       seed=args.seed, test_cases=0)
        if not args.no_distractors:
            add_distractors(root, args.seed)

        def cache(name, ids, n_slices=None, mode="even", fraction=0.5):
            return build_cache(root, folder / name, normalise=True, n_slices=n_slices, size=args.size, mode=mode,
                               case_indices=ids, foreground_fraction=fraction)

        valid_whole = load(cache("valid-whole", valid_ids))
        test_whole = load(cache("test-whole", test_ids))
        labelled = (test_whole[1] > 0).flatten(1).any(1).float().mean().item()
        print(f"atrium {' x '.join(map(str, args.shape))} -> {args.size[0]} x {args.size[1]}"
              f"{'' if args.no_distractors else ' with distractors'}: {n_train} training, {args.valid} validation, "
              f"{args.test} test case(s); {labelled:.0%} of the test slices hold a label; U-Net "
              f"{args.depth}x{args.base_channels}, {args.epochs} epochs, {args.slices} slices per volume, mean of "
              f"{args.seeds} seed(s) (data {time.perf_counter() - start:.1f} s)", flush=True)
        rows = []
        for mode, fraction in args.setups:
            t0 = time.perf_counter()
            name = mode if mode != "mixed" else f"mixed {fraction:g}"
            tag = name.replace(" ", "-")
            images, labels = load(cache(f"train-{tag}", train_ids, args.slices, mode, fraction))
            valid_sampled = load(cache(f"valid-{tag}", valid_ids, args.slices, mode, fraction))
            dice = []
            for seed in range(args.seed, args.seed + args.seeds):
                net = train(images, labels, args, seed)
                dice.append([foreground_dice(net, *data) for data in (valid_sampled, valid_whole, test_whole)])
            (a, b, c), low = np.mean(dice, axis=0), np.min(dice, axis=0)[2]
            share = (labels > 0).flatten(1).any(1).float().mean().item()
            rows.append((name, str(len(images)), f"{share:.2f}", f"{a:.3f}", f"{b:.3f}", f"{c:.3f}", f"{low:.3f}",
                         f"{a - c:+.3f}", f"{b - c:+.3f}", f"{time.perf_counter() - t0:.1f}"))
            print(f"  {name}: (c) per seed {' '.join(f'{d[2]:.3f}' for d in dice)}", file=sys.stderr, flush=True)
        print(table(("setup", "train slices", "fg share", "(a) valid sampled", "(b) valid whole", "(c) test whole",
                     "(c) worst seed", "(a)-(c)", "(b)-(c)", "time s"), rows))
        print(f"wall time {time.perf_counter() - start:.1f} s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
