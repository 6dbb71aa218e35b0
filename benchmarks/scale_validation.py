"""Validate ``autocnnp scale`` against real runs on this machine: predicted samples/s at every rank count
this machine can run, next to the samples/s the job reaches with that many ranks.

    python benchmarks/scale_validation.py [--rounds 3] [--ranks 1,2] [--epochs 3] [--set KEY=VALUE ...]

Each round predicts (``autocnnp scale JOB --link measured --json``: a fresh profile and link measurement)
and then trains the job with each rank count (``autocnnp run --set parallelism-degree=N``), back to back,
so the machine's drifting load weighs on both alike. The measured figure is ranks x minibatch / step time,
the median step time the ranks recorded (``resources/rankN.csv`` ``step_ms``, the data wait included; the
first quarter of the samples dropped as warm-up), as the profile takes the median of its steps. Reported:
the median over rounds of each, and of the paired error (prediction / measurement - 1). Goal: within 15 %.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _bench import ROOT, table

DEMO = ROOT / "xml_configs" / "demo.xml"
GOAL = 0.15
# the demo with enough steps per epoch for a steady step time, and no checkpoints or plots to write
DEFAULT_SETS = ("data.train_samples=512", "checkpoint.every_epochs=100", "monitoring.progress=false",
                "monitoring.sample_interval_s=0.5")


def step_ms(rundir: Path) -> float:
    """The median step time of every rank's samples after the first quarter (warm-up): the typical step,
    not the stalls other processes on a shared machine cause now and then."""
    values = []
    for path in sorted((rundir / "resources").glob("rank*.csv")):
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if r["step_ms"]]
        values += [float(r["step_ms"]) for r in rows[len(rows) // 4:]]
    return statistics.median(values)


def autocnnp(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "autocnnp", *args], check=True, capture_output=True, cwd=ROOT)


def predict(job: Path, sets: list[str], ranks: list[int], out: Path) -> dict[int, float]:
    """``autocnnp scale``'s samples/s per rank count."""
    autocnnp("scale", str(job), *(f"--set={s}" for s in sets), "--ranks", ",".join(map(str, ranks)),
             "--link", "measured", "--steps", "30", "--json", str(out))
    return {row["world_size"]: row["samples_s"] for row in json.loads(out.read_text())["rows"]}


def measure(job: Path, sets: list[str], ranks: int, epochs: int, batch: int, out: Path) -> float:
    """Samples/s of a real run with ``ranks`` ranks."""
    autocnnp("run", str(job), *(f"--set={s}" for s in sets), f"--set=output={out}", f"--set=parallelism-degree={ranks}",
             f"--set=hyperparameters.end_epoch={epochs}")
    return ranks * batch / step_ms(out) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", type=Path, default=DEMO)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ranks", default="1,2", help="rank counts this machine can run")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more job overrides")
    args = parser.parse_args()
    sets = [*DEFAULT_SETS, *args.set]
    ranks = [int(n) for n in args.ranks.split(",")]
    sys.path.insert(0, str(ROOT))
    from autocnnp.run.job import load_job

    batch = load_job(args.job, sets).generator.hyperparameters.minibatch_size
    predicted: dict[int, list[float]] = {n: [] for n in ranks}
    measured: dict[int, list[float]] = {n: [] for n in ranks}
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            for n, value in predict(args.job, sets, ranks, Path(tmp) / "scale.json").items():
                predicted[n].append(value)
            for n in ranks:
                measured[n].append(measure(args.job, sets, n, args.epochs, batch, Path(tmp) / f"run-{n}"))
        print(f"round {i + 1}: " + "; ".join(f"{n} rank(s) predicted {predicted[n][-1]:.1f}, measured "
                                               f"{measured[n][-1]:.1f} samples/s" for n in ranks), flush=True)
    rows = []
    for n in ranks:
        errors = [p / m - 1 for p, m in zip(predicted[n], measured[n])]
        rows.append((str(n), f"{statistics.median(predicted[n]):.1f}", f"{statistics.median(measured[n]):.1f}",
                     f"{statistics.median(errors):+.1%}", f"{min(errors):+.1%} .. {max(errors):+.1%}"))
    speedups = [p[-1] / p[0] for p in zip(*(predicted[n] for n in ranks))], \
               [m[-1] / m[0] for m in zip(*(measured[n] for n in ranks))]
    print(table(("ranks", "predicted samples/s", "measured samples/s", "median error", "range"), rows))
    print(f"speedup {ranks[0]} -> {ranks[-1]} ranks: predicted {statistics.median(speedups[0]):.2f}x, "
          f"measured {statistics.median(speedups[1]):.2f}x")
    worst = max(abs(statistics.median(p / m - 1 for p, m in zip(predicted[n], measured[n]))) for n in ranks)
    print(f"largest median error {worst:.1%} (goal within {GOAL:.0%}) -> {'met' if worst <= GOAL else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
