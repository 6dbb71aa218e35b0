"""Every class learns: the brain example as shipped, scored class by class on held-out volumes.

    python benchmarks/brain_every_class.py [--seeds 0 1] [--test-cases 2] [--set KEY=VALUE ...]

For each seed, writes the synthetic stand-in of Task01_BrainTumour (``autocnnp synth``: 6 labelled cases
of 32 x 32 x 16 voxels, 4 modalities, labels 0-3, and ``--test-cases`` held-out cases with their labels,
all drawn from that seed), trains ``xml_configs/brain_tumour_unet.xml`` on it unchanged but for the data
path, the output folder and the job's seed (2 MPI ranks on CPU, its size, epochs, loss and sampling),
predicts the held-out cases with the best checkpoint and scores them with ``autocnnp evaluate``. Prints
the held-out Dice of every class (confusion counts pooled over the cases) and the time taken; exits 1
when a foreground class stays below ``--goal`` (0.5) for some seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, table  # noqa: E402

JOB = ROOT / "xml_configs" / "brain_tumour_unet.xml"


def autocnnp(*args) -> None:
    done = subprocess.run([sys.executable, "-m", "autocnnp", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"autocnnp {' '.join(map(str, args))} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def held_out_dice(folder: Path, seed: int, test_cases: int, overrides: list[str]) -> tuple[dict[str, float], float]:
    """({class name: held-out Dice}, seconds to train) of the brain example trained with ``seed``."""
    from autocnnp.data.synth import write_synthetic_dataset

    data = write_synthetic_dataset(folder / "Task01_BrainTumour", "brain", seed=seed, test_cases=test_cases)
    run, predictions = folder / "run", folder / "predictions"
    start = time.perf_counter()
    autocnnp("run", JOB, "--set", f"data.train={data}", "--set", f"output={run}", "--set", f"seed={seed}",
             *[a for o in overrides for a in ("--set", o)])
    took = time.perf_counter() - start
    autocnnp("predict", "--checkpoint", run, "--input", data, "--split", "test", "--out", predictions)
    autocnnp("evaluate", predictions, data, "--out", folder / "scores.json")
    overall = json.loads((folder / "scores.json").read_text())["overall"]
    return {k.removeprefix("dice/"): v for k, v in overall.items() if k.startswith("dice/")}, took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--test-cases", type=int, default=2)
    parser.add_argument("--goal", type=float, default=0.5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a job override")
    args = parser.parse_args()
    rows, missed = [], []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="brain-every-class-") as tmp:
            dice, took = held_out_dice(Path(tmp), seed, args.test_cases, args.set)
        names = list(dice)
        rows.append([str(seed), *(f"{dice[n]:.3f}" for n in names), f"{took:.0f}"])
        print(f"seed {seed}: " + ", ".join(f"{n} {dice[n]:.3f}" for n in names) + f" ({took:.0f} s)", file=sys.stderr)
        missed += [f"seed {seed}: {n} {dice[n]:.3f}" for n in names[1:] if not dice[n] >= args.goal]
    print(f"held-out Dice per class of {JOB.name} (synthetic stand-in, {args.test_cases} test cases per seed)")
    print(table(["seed", *names, "train s"], rows))
    if missed:
        print(f"below the goal {args.goal}: " + "; ".join(missed))
        return 1
    print(f"every foreground class >= {args.goal} for every seed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
