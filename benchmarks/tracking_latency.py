"""Tracking latency: how long after ``autocnnp run`` the MLflow run exists, and how long after the console
prints an epoch its metrics are in the store (what the dashboard shows).

    python benchmarks/tracking_latency.py [--epochs 4] [--rounds 1]

Runs the demo job (2 ranks, synthetic data) with ``tracker=mlflow`` and its local SQLite store twice per round:
in a new store (MLflow makes its tables first: seconds) and again in the same store, reads the console and
polls the store's tables (sqlite3, not mlflow: the probe must not load the machine). Goal: the run exists
within 10 s of the command, and every epoch is in the store within 10 s of its console line.
"""

from __future__ import annotations

import argparse
import math
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "xml_configs" / "demo.xml"
GOAL_S = 10.0
EPOCH_METRIC = "lr"  # logged at every epoch's end


def _query(db: Path, sql: str) -> list[tuple]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute(sql).fetchall()
    except sqlite3.Error:  # tables not made yet, or the writer holds the database
        return []


def one(folder: Path, name: str, epochs: int) -> tuple[float, list[float]]:
    """(seconds from the command to the run in the store, per epoch: seconds from its console line to the store)."""
    out = folder / name
    db = folder / "mlflow" / "mlflow.db"
    printed: dict[int, float] = {}
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "autocnnp", "run", str(DEMO), "--set", f"output={out}",
                             "--set", "monitoring.tracker=mlflow", "--set", f"hyperparameters.end_epoch={epochs}",
                             "--set", "monitoring.progress=false"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)

    def read() -> None:
        for line in proc.stdout:
            if m := re.match(r"epoch (\d+)/", line):
                printed[int(m.group(1))] = time.time()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    created, stored = None, {}
    try:
        while len(stored) < epochs and time.time() - start < 600:
            now = time.time()
            if created is None and _query(db, f"select run_uuid from runs where name = '{name}'"):
                created = now - start
            for (step,) in _query(db, f"select distinct step from metrics join runs on metrics.run_uuid = runs.run_uuid "
                                      f"where key = '{EPOCH_METRIC}' and name = '{name}'"):
                stored.setdefault(int(step), now)
            if proc.poll() is not None and now - printed.get(epochs, now) > 60:
                break
            time.sleep(0.2)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=5)
    if proc.returncode != 0 or created is None:
        raise SystemExit(f"the run failed with exit code {proc.returncode}, or never reached the store")
    return created, [stored[e] - printed[e] if e in stored else math.inf for e in sorted(printed)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    worst_run, worst_epoch = 0.0, 0.0
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            for store, name in (("new", "first"), ("same", "second")):
                created, lags = one(Path(tmp), name, args.epochs)
                worst_run, worst_epoch = max(worst_run, created), max(worst_epoch, *lags)
                print(f"round {i + 1}, {store} store: run in the store {created:.1f} s after the command; epoch in "
                      f"the store after its console line: {', '.join(f'{lag:.1f}' for lag in lags)} s", flush=True)
    met = worst_run <= GOAL_S and worst_epoch <= GOAL_S
    print(f"worst: run {worst_run:.1f} s, epoch {worst_epoch:.1f} s (goal {GOAL_S:g} s each) -> "
          f"{'met' if met else 'not met'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
