"""Time and peak memory of ``autocnnp evaluate`` on one large prediction/reference pair (a CT-sized case).

    python benchmarks/evaluate_speed.py [--shape 512,512,300] [--cases 1] [--workers 1] [--compare /work/main]

Builds a synthetic CT-like pair as uint8 NIfTI (``.nii.gz``, 0.8 x 0.8 x 1.5 mm): the reference holds a body
(class 1, an ellipsoid filling most of each slice), an organ inside it (class 2) and three small lesions
(class 3); the prediction shifts and reshapes the body and the organ by a few voxels, finds one lesion, misses
two and adds a false one (``--cases N``: N copies of the pair). Then runs ``python -m autocnnp evaluate PRED
REF --out report.json`` as a subprocess and reports its wall time and peak resident memory (``wait4``'s
``ru_maxrss``: the largest of the process and its workers), with the machine's load.
``--compare PATH`` runs the same command with ``PYTHONPATH=PATH`` (another checkout, e.g. the code before a
change) in the same run, alternated, and compares the per-case values of the two reports. The issue's goal for
a 512 x 512 x 300 pair on 2 cores: under 15 s and under 1 GB. Figures, not asserts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, measured, table  # noqa: E402

SPACING = (0.8, 0.8, 1.5)
GOAL_SECONDS, GOAL_BYTES = 15.0, 1 << 30


def ellipsoid(shape, centre, radii) -> tuple[tuple[slice, ...], object]:
    """``(box, mask)``: an ellipsoid's boolean mask within its bounding box in a volume of ``shape``."""
    import numpy as np

    lo = [max(0, int(c - r)) for c, r in zip(centre, radii)]
    hi = [min(s, int(c + r) + 2) for s, c, r in zip(shape, centre, radii)]
    axes = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
    mask = sum(((x - c) / r) ** 2 for x, c, r in zip(axes, centre, radii)) <= 1
    return tuple(slice(a, b) for a, b in zip(lo, hi)), mask


def paint(volume, value: int, centre, radii) -> None:
    box, mask = ellipsoid(volume.shape, centre, radii)
    volume[box][mask] = value


def case_pair(shape) -> tuple:
    """``(reference, prediction)`` label volumes (uint8) of a CT-like case (module docstring)."""
    import numpy as np

    x, y, z = shape
    truth, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    paint(truth, 1, (x / 2, y / 2, z / 2), (0.42 * x, 0.36 * y, 0.55 * z))
    paint(pred, 1, (x / 2 + 2, y / 2 - 1, z / 2), (0.42 * x + 1, 0.36 * y, 0.55 * z - 2))
    paint(truth, 2, (0.4 * x, 0.45 * y, 0.5 * z), (0.12 * x, 0.1 * y, 0.15 * z))
    paint(pred, 2, (0.4 * x + 3, 0.45 * y, 0.5 * z + 1), (0.12 * x - 2, 0.1 * y + 1, 0.15 * z))
    lesions = [(0.6 * x, 0.5 * y, 0.4 * z), (0.55 * x, 0.6 * y, 0.6 * z), (0.35 * x, 0.62 * y, 0.45 * z)]
    for centre in lesions:
        paint(truth, 3, centre, (6, 6, 4))
    paint(pred, 3, lesions[0], (5, 6, 4))  # one lesion found, two missed
    paint(pred, 3, (0.65 * x, 0.4 * y, 0.55 * z), (4, 4, 3))  # and a false one
    return truth, pred


def write_pair(folder: Path, shape, cases: int = 1) -> tuple[Path, Path]:
    """The folders ``pred`` and ``ref`` in ``folder``, each holding ``cases`` copies of the pair's volume."""
    import shutil

    import nibabel as nib
    import numpy as np

    truth, pred = case_pair(shape)
    affine = np.diag([*SPACING, 1.0])
    for sub, volume in (("ref", truth), ("pred", pred)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(volume, affine), folder / sub / "case_000.nii.gz")
        for i in range(1, cases):
            shutil.copyfile(folder / sub / "case_000.nii.gz", folder / sub / f"case_{i:03d}.nii.gz")
    return folder / "pred", folder / "ref"


def run_evaluate(pythonpath: str, pred: Path, ref: Path, out: Path, workers: int) -> tuple[float, int, int]:
    """``(seconds, peak RSS in bytes, exit code)`` of one ``autocnnp evaluate`` subprocess."""
    cmd = [sys.executable, "-m", "autocnnp", "evaluate", str(pred), str(ref), "--out", str(out)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    seconds, peak, rc, text = measured(cmd, pythonpath, out.parent)  # not in a checkout: PYTHONPATH decides
    if rc:
        print(text, file=sys.stderr)
    return seconds, peak, rc


def compare(old: Path, new: Path) -> str:
    """How far the per-case values of two reports lie apart (where both are finite numbers)."""
    def cases(path):
        return {r["case"]: r for r in json.loads(path.read_text())["cases"]}

    a, b = cases(old), cases(new)
    worst, differing = 0.0, []
    for case, row in a.items():
        for key, value in row.items():
            other = b.get(case, {}).get(key)
            if isinstance(value, float) and isinstance(other, float) and math.isfinite(value):
                worst = max(worst, abs(value - other))
            elif value != other and key != "case":
                differing.append(f"{key}: {value} -> {other}")
    return f"largest difference of per-case values: {worst:.2g}" + (f"; changed: {', '.join(differing)}"
                                                                      if differing else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="512,512,300", help="volume shape X,Y,Z (default 512,512,300)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each variant, alternated (default 1)")
    ap.add_argument("--cases", type=int, default=1, help="copies of the pair to score (default 1)")
    ap.add_argument("--workers", type=int, default=1, help="evaluate --workers (default 1)")
    ap.add_argument("--compare", default=None, help="also run evaluate from this checkout (PYTHONPATH), e.g. /work/main")
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    variants = {"this checkout": str(ROOT)}
    if args.compare:
        variants = {f"{args.compare}": str(Path(args.compare).resolve()), **variants}
    with tempfile.TemporaryDirectory(prefix="autocnnp-evaluate-bench-") as tmp:
        folder = Path(tmp)
        pred, ref = write_pair(folder, shape, args.cases)
        megabytes = sum(f.stat().st_size for f in folder.rglob("case_000.nii.gz")) / 1e6
        print(f"evaluate: {args.cases} x one {' x '.join(map(str, shape))} uint8 pair ({megabytes:.1f} MB as .nii.gz), "
              f"--workers {args.workers}, "
              f"spacing {SPACING} mm, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} before")
        figures: dict[str, list[tuple[float, int]]] = {}
        for r in range(args.rounds):
            for label, path in variants.items():  # alternated: A B A B
                seconds, peak, rc = run_evaluate(path, pred, ref, folder / f"{len(figures.get(label, []))}"
                                                 f"-{list(variants).index(label)}.json", args.workers)
                if rc:
                    print(f"{label}: evaluate failed (exit code {rc})", file=sys.stderr)
                    return 1
                figures.setdefault(label, []).append((seconds, peak))
        rows = [(label, f"{statistics.median(s for s, _ in runs):.1f}", f"{max(p for _, p in runs) / 2**20:.0f}",
                 " ".join(f"{s:.1f}" for s, _ in runs)) for label, runs in figures.items()]
        print(table(("code", "seconds (median)", "peak RSS MiB", "seconds by round"), rows))
        print(f"load {os.getloadavg()[0]:.2f} after; goal: under {GOAL_SECONDS:g} s and {GOAL_BYTES / 2**30:g} GiB")
        if args.compare:
            print(compare(folder / "0-0.json", folder / "0-1.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
