"""Slice-cache build speed on BraTS-sized synthetic volumes: slices/s and seconds per volume.

    python benchmarks/preprocess_speed.py [--cases 4] [--shape 240 240 155] [--slices 70] [--size 512]
                                          [--workers 1,2] [--old PATH] [--nii] [--rounds 1] [--profile]

Writes ``--cases`` synthetic brain cases (``autocnnp synth --kind brain``: 4 modalities, float32,
``.nii.gz`` as the Decathlon ships them) to a temporary folder, then builds the slice cache of
``autocnnp preprocess`` (``--slices`` per volume, ``--size`` pixels, every modality, z-scored) once
per variant and round, each build in a fresh process into an empty cache folder:

* ``new``: this checkout's ``build_cache`` with each of ``--workers``;
* ``old``: the code at ``--old PATH`` (e.g. ``git worktree add /tmp/pp-old HEAD``), on the same files;
* ``nii``: with ``--nii``, this checkout on uncompressed ``.nii`` copies of the same cases.

The variants alternate within each round (the machine is noisy); the table shows medians. The source
files sit in the page cache (just written), so "disk speed" here is the speed of reading them from
memory. ``--profile`` also prints where one single-process build of the first case spends its time
(cProfile, top functions by cumulative time). Figures, not asserts.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, table  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=4, help="synthetic cases (default 4)")
    ap.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155], metavar=("X", "Y", "Z"))
    ap.add_argument("--slices", type=int, default=70, help="slices per volume (default 70)")
    ap.add_argument("--size", type=int, default=512, help="slice side after resizing (default 512)")
    ap.add_argument("--workers", default="1,2", help="worker counts of this checkout, comma-separated")
    ap.add_argument("--old", type=Path, help="a checkout of the old code to measure side by side")
    ap.add_argument("--nii", action="store_true", help="also measure uncompressed .nii copies")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="cProfile one single-process build of one case")
    ap.add_argument("--build", nargs=2, metavar=("DATA", "CACHE"), help=argparse.SUPPRESS)  # one timed build
    return ap.parse_args(argv)


def build_once(data: str, cache: str, args) -> None:
    """Build the cache of ``data`` in ``cache`` with the ``build_cache`` on ``sys.path``; print JSON."""
    from autocnnp.data.preprocess import build_cache, read_cache_meta

    extra = {"workers": int(args.workers)} if "workers" in inspect.signature(build_cache).parameters else {}
    start = time.perf_counter()
    build_cache(data, cache, normalise=True, n_slices=args.slices, size=args.size, mode="even", **extra)
    seconds = time.perf_counter() - start
    meta = read_cache_meta(cache)
    print(json.dumps({"seconds": seconds, "count": meta["count"], "cases": len(meta["cases"]),
                      "dtype": meta["dtype"]["images"]}))


def uncompressed_copy(src: Path, dst: Path) -> Path:
    """The dataset ``src`` with every ``.nii.gz`` written again as ``.nii`` in ``dst``."""
    import nibabel as nib

    index = json.loads((src / "dataset.json").read_text())
    for entry in index["training"]:
        for role in ("image", "label"):
            name = entry[role].replace(".nii.gz", ".nii")
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.load(str(src / entry[role])), str(dst / name))
            entry[role] = name
    (dst / "dataset.json").write_text(json.dumps(index))
    return dst


def measure(code: Path, data: Path, workers: int, scratch: Path, args) -> dict:
    """One build in a fresh process running the code at ``code``, into an empty cache folder."""
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=scratch))
    env = dict(os.environ, PYTHONPATH=str(code))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--build", str(data), str(cache), "--workers", str(workers),
           "--slices", str(args.slices), "--size", str(args.size)]
    try:
        done = subprocess.run(cmd, env=env, cwd=scratch, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"build with {code} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def profile_one_case(data: Path, scratch: Path, args) -> None:
    from autocnnp.data.preprocess import build_cache

    extra = {"workers": 1} if "workers" in inspect.signature(build_cache).parameters else {}
    profiler = cProfile.Profile()
    profiler.enable()
    build_cache(data, scratch / "profile-cache", normalise=True, n_slices=args.slices, size=args.size, case_indices=[0], **extra)
    profiler.disable()
    shutil.rmtree(scratch / "profile-cache", ignore_errors=True)
    print("\nwhere one case's time goes (cProfile, single process, cumulative seconds):")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(18)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.build:
        build_once(*args.build, args)
        return 0
    from autocnnp.data.synth import write_synthetic_dataset

    scratch = Path(tempfile.mkdtemp(prefix="autocnnp-preprocess-speed-"))
    try:
        start = time.perf_counter()
        data = write_synthetic_dataset(scratch / "gz", "brain", cases=args.cases, shape=tuple(args.shape), seed=0,
                                       test_cases=0)
        size_mb = sum(p.stat().st_size for p in (data / "imagesTr").iterdir()) / args.cases / 2**20
        print(f"{args.cases} synthetic brain cases of {' x '.join(map(str, args.shape))} x 4 written in "
              f"{time.perf_counter() - start:.1f} s (.nii.gz images {size_mb:.0f} MiB each); cache: {args.slices} "
              f"slices per volume, {args.size} x {args.size}, all modalities, z-scored")
        variants = [(f"new, {w} worker(s)", ROOT, data, int(w)) for w in args.workers.split(",")]
        if args.nii:
            nii = uncompressed_copy(data, scratch / "nii")
            variants += [(f"new .nii, {w} worker(s)", ROOT, nii, int(w)) for w in args.workers.split(",")]
        if args.old:
            variants.insert(0, ("old", args.old.resolve(), data, 1))
        results: dict[str, list[dict]] = {name: [] for name, *_ in variants}
        for r in range(args.rounds):
            for name, code, folder, workers in variants:
                results[name].append(measure(code, folder, workers, scratch, args))
                print(f"round {r + 1}: {name}: {results[name][-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
        base = statistics.median(x["seconds"] for x in results[variants[0][0]])
        rows = []
        for name, *_ in variants:
            seconds = statistics.median(x["seconds"] for x in results[name])
            count, cases = results[name][0]["count"], results[name][0]["cases"]
            rows.append((name, results[name][0]["dtype"], f"{seconds:.2f}", f"{count / seconds:.1f}",
                         f"{seconds / cases:.3f}", f"{base / seconds:.2f}x"))
        print(table(("variant", "images", "seconds", "slices/s", "s/volume", f"vs {variants[0][0]}"), rows))
        if args.profile:
            profile_one_case(data, scratch, args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
