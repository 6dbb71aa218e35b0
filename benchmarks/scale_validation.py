"""Validate ``autocnnp scale`` against real runs on this machine: predicted samples/s at every rank count
this machine can run, next to the samples/s the job reaches with that many ranks, for the demo job and
two user architectures given by path (benchmarks/scale_small_net.py, 27 k parameters;
benchmarks/scale_large_net.py, 15 M parameters, 61 MB of gradients a step).

    python benchmarks/scale_validation.py [--models demo,small,large] [--rounds 3] [--ranks 1,2] [--epochs 3]
                                          [--set KEY=VALUE ...] [--source CHECKOUT ...]

The figure compared is the steady-state training throughput: what ``autocnnp scale`` predicts, and what
the console's epoch line shows (``samples/s=``: the epoch's samples over its steps' time; validation and
checkpoints, once an epoch, are not in it). Each round, for each model, predicts (``autocnnp scale JOB
--link measured --json``: a fresh profile and link measurement) and then trains the job with each rank count
(``autocnnp run --set parallelism-degree=N``), back to back, so the machine's drifting load weighs on both
alike. The measured figure is the median of the epochs' samples/s after the first (warm-up). Reported: each
round's pair and error (with the load average) and the step's parts, predicted (data, compute, exposed
exchange) and measured (means over ``resources/rankN.csv`` of the step, its data wait and its collectives,
the first quarter of the rows dropped), then per model the median over rounds of each and of the paired
error (prediction / measurement - 1). Other sessions' processes on the machine swing the measured side itself.
Goal: within 15 %.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _bench import ROOT, table

DEMO = ROOT / "xml_configs" / "demo.xml"
MODELS = {"demo": None, "small": Path(__file__).parent / "scale_small_net.py",
          "large": Path(__file__).parent / "scale_large_net.py"}
GOAL = 0.15
# the demo with enough steps per epoch for a steady step time, and no checkpoints or plots to write
DEFAULT_SETS = ("data.train_samples=512", "checkpoint.every_epochs=100", "monitoring.progress=false",
                "monitoring.sample_interval_s=0.5")


def step_ms(rundir: Path, column: str = "step_ms") -> float:
    """The mean of ``column`` (the step time, or its data wait or collectives) over every rank's rows after
    the first quarter (warm-up)."""
    values = []
    for path in sorted((rundir / "resources").glob("rank*.csv")):
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if r["step_ms"]]
        values += [float(r[column] or 0) for r in rows[len(rows) // 4:]]
    return statistics.fmean(values)


def autocnnp(*args: str, source: Path = ROOT) -> str:
    """Run the command from checkout ``source``; its standard output."""
    return subprocess.run([sys.executable, "-m", "autocnnp", *args], check=True, capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(source)}).stdout


def predict(job: Path, sets: list[str], ranks: list[int], out: Path, source: Path) -> dict[int, dict]:
    """``autocnnp scale``'s rows (samples/s and the step's parts) per rank count, as checkout ``source``
    predicts them."""
    autocnnp("scale", str(job), *(f"--set={s}" for s in sets), "--ranks", ",".join(map(str, ranks)),
             "--link", "measured", "--steps", "30", "--json", str(out), source=source)
    return {row["world_size"]: row for row in json.loads(out.read_text())["rows"]}


def measure(job: Path, sets: list[str], ranks: int, epochs: int, out: Path) -> tuple[float, str]:
    """Samples/s of a real run with ``ranks`` ranks (the median of its epochs' after the first), and its step's
    parts (ms) as the ranks recorded them."""
    console = autocnnp("run", str(job), *(f"--set={s}" for s in sets), f"--set=output={out}",
                       f"--set=parallelism-degree={ranks}", f"--set=hyperparameters.end_epoch={epochs}")
    per_epoch = [float(m) for m in re.findall(r"^epoch \d+/\d+ .*samples/s=([\d.]+)", console, re.M)]
    step = step_ms(out)
    return statistics.median(per_epoch[1:]), (f"step {step:.1f} = data wait {step_ms(out, 'data_wait_ms'):.1f} + "
                                             f"collectives {step_ms(out, 'collective_wait_ms'):.1f} + the rest")


def parts(row: dict) -> str:
    """The predicted step's parts (ms)."""
    return (f"step {row['step_s'] * 1e3:.1f} = data {row['data_s'] * 1e3:.1f} + compute {row['compute_s'] * 1e3:.1f} "
            f"+ exposed exchange {row['exposed_s'] * 1e3:.1f}")


def job_with(architecture: Path | None, folder: Path) -> Path:
    """The demo job, with the user architecture at ``architecture`` (a path) in place of its U-Net."""
    if architecture is None:
        return DEMO
    text = re.sub(r"<CNN_archi name=.*?</CNN_archi>", f"<CNN_archi><path>{architecture.resolve()}</path></CNN_archi>",
                  DEMO.read_text(), flags=re.S)
    job = folder / f"{architecture.stem}.xml"
    job.write_text(text)
    return job


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"some of {', '.join(MODELS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ranks", default="1,2", help="rank counts this machine can run")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each run (the first is warm-up)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more job overrides")
    parser.add_argument("--source", type=Path, action="append", help="a checkout whose `autocnnp scale` predicts "
                        "(repeated: side by side in the same rounds, e.g. --source /tmp/before --source .); the runs "
                        "measured are this checkout's")
    args = parser.parse_args()
    sets = [*DEFAULT_SETS, *args.set]
    ranks = [int(n) for n in args.ranks.split(",")]
    models = args.models.split(",")
    sources = [s.resolve() for s in args.source or [ROOT]]
    predicted = {(src, m, n): [] for src in sources for m in models for n in ranks}
    measured = {(m, n): [] for m in models for n in ranks}
    with tempfile.TemporaryDirectory() as jobs:
        for i in range(args.rounds):
            for model in models:
                job = job_with(MODELS[model], Path(jobs))
                with tempfile.TemporaryDirectory() as tmp:
                    rows = {src: predict(job, sets, ranks, Path(tmp) / f"scale-{k}.json", src)
                            for k, src in enumerate(sources)}
                    for n in ranks:
                        samples_s, breakdown = measure(job, sets, n, args.epochs, Path(tmp) / f"run-{n}")
                        measured[model, n].append(samples_s)
                        print(f"  {model}, {n} rank(s): measured {samples_s:.1f} samples/s, {breakdown}", flush=True)
                        for src in sources:
                            predicted[src, model, n].append(rows[src][n]["samples_s"])
                            print(f"    {src}: predicted {rows[src][n]['samples_s']:.1f} samples/s "
                                  f"({rows[src][n]['samples_s'] / samples_s - 1:+.1%}), {parts(rows[src][n])}",
                                  flush=True)
                print(f"round {i + 1}, {model}: load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for src in sources:
        for model in models:
            for n in ranks:
                p, m = predicted[src, model, n], measured[model, n]
                errors = [a / b - 1 for a, b in zip(p, m)]
                rows.append((str(src)[-24:], model, str(n), f"{statistics.median(p):.1f}", f"{statistics.median(m):.1f}",
                             f"{statistics.median(errors):+.1%}", f"{min(errors):+.1%} .. {max(errors):+.1%}"))
    print(table(("source", "model", "ranks", "predicted samples/s", "measured samples/s", "median error", "range"),
                rows))
    for src in sources:
        worst = max(abs(statistics.median(a / b - 1 for a, b in zip(predicted[src, m, n], measured[m, n])))
                    for m in models for n in ranks)
        print(f"{src}: largest median error {worst:.1%} (goal within {GOAL:.0%}) -> "
              f"{'met' if worst <= GOAL else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
