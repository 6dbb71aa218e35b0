"""Tracking overhead: the framework's step time with and without the mlflow tracker, same job, alternated.

    python benchmarks/tracking_overhead.py [--rounds 5] [--epochs 10]

Runs the demo job (2 ranks, synthetic data) ``--rounds`` times with ``tracker=files`` and as often with
``tracker=files,mlflow`` (its local SQLite store, sending every second), alternating, and compares the
mean optimizer step time the ranks recorded (``resources/rankN.csv``: ``step_ms``, the data wait
included). The figure is the median over rounds of the paired ratio (each round runs both, back to
back: the machine's drift cancels). Goal: the mlflow tracker costs under 2 % of a step.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "xml_configs" / "demo.xml"
GOAL = 0.02


def step_ms(rundir: Path) -> float:
    """Mean step time over both ranks' samples, weighted equally per sample (first epoch excluded: warm-up)."""
    values = []
    for path in sorted((rundir / "resources").glob("rank*.csv")):
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if r["step_ms"]]
        values += [float(r["step_ms"]) for r in rows[len(rows) // 4:]]
    return statistics.fmean(values)


def one(folder: Path, trackers: str, epochs: int) -> float:
    out = folder / trackers.replace(",", "-")
    subprocess.run([sys.executable, "-m", "autocnnp", "run", str(DEMO), "--set", f"output={out}",
                    "--set", f"monitoring.tracker={trackers}", "--set", f"hyperparameters.end_epoch={epochs}",
                    "--set", "monitoring.progress=false", "--set", "monitoring.sample_interval_s=0.5"],
                   check=True, capture_output=True)
    return step_ms(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    files, mlflow = [], []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            files.append(one(Path(tmp), "files", args.epochs))
            mlflow.append(one(Path(tmp), "files,mlflow", args.epochs))
        print(f"round {i + 1}: files {files[-1]:.2f} ms/step, files+mlflow {mlflow[-1]:.2f} ms/step "
              f"({mlflow[-1] / files[-1] - 1:+.1%})", flush=True)
    overhead = statistics.median(b / a - 1 for a, b in zip(files, mlflow))
    print(f"median step time: files {statistics.median(files):.2f} ms, files+mlflow {statistics.median(mlflow):.2f} "
          f"ms; median paired overhead {overhead:+.2%} (goal under {GOAL:.0%}) -> {'met' if overhead < GOAL else 'not met'}")
    return 0 if overhead < GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
