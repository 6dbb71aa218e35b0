"""``autocnnp run --repeat K``: the same setting trained K times with seeds seed, seed+1, ..., seed+K-1.

Thesis section 5.5 recommends several runs per setting (the optimisation is stochastic) and reporting
the variability. Each run trains in ``OUTPUT/seed-<s>/`` with its own manifest.json; the set writes
``OUTPUT/repeats.csv`` (one row per seed, then ``mean`` and ``std``: the sample standard deviation,
n - 1) and ``OUTPUT/manifest.json`` (the job, the seeds, the summary), and prints the table. Running
the command again resumes: finished seeds are not retrained, an interrupted one goes on from its
checkpoints.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import statistics
from pathlib import Path

from ..engine.errors import JobError
from ..engine.overrides import apply_overrides
from . import manifest as mf

SUMMARY_METRICS = ("dice", "pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou", "valid_loss", "train_loss")
DIVERGED = 3


def seed_generator(gen, seed: int):
    """``gen`` for one repeat: its seed, its own output folder (passed on to the workers as overrides)."""
    out = Path(gen.output) / f"seed-{seed}"
    spec = apply_overrides(gen.job, {"seed": str(seed), "output": str(out)})
    return dataclasses.replace(gen, job=spec, seed=seed, output=out)


def summarise(results: dict[int, dict]) -> dict[str, dict[str, float]]:
    """metric -> {"mean", "std", "n"} over the seeds that finished (std: sample, n - 1; NaN for n = 1)."""
    out = {}
    names = [m for m in SUMMARY_METRICS if any(m in r for r in results.values())]
    for name in names:
        values = [float(r[name]) for r in results.values() if r.get(name) not in (None, "")]
        values = [v for v in values if math.isfinite(v)]
        if values:
            out[name] = {"mean": statistics.fmean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else math.nan, "n": len(values)}
    return out


def write_summary(path: Path, results: dict[int, dict], status: dict[int, str], summary: dict) -> Path:
    names = list(summary) or list(SUMMARY_METRICS)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "status", "epochs", *names])
        for seed, r in results.items():
            w.writerow([seed, status.get(seed, ""), r.get("epoch", -1) + 1 if "epoch" in r else "",
                        *[repr(float(r[n])) if n in r else "" for n in names]])
        for stat in ("mean", "std"):
            w.writerow([stat, "", "", *[repr(summary[n][stat]) if n in summary else "" for n in names]])
    os.replace(tmp, path)
    return path


def format_summary(results: dict[int, dict], summary: dict) -> str:
    seeds = list(results)
    head = ["metric", "mean", "std", *[f"seed {s}" for s in seeds]]
    rows = [[n, f"{v['mean']:.4f}", "" if math.isnan(v["std"]) else f"{v['std']:.4f}",
             *[f"{float(results[s][n]):.4f}" if n in results[s] else "" for s in seeds]] for n, v in summary.items()]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def run_repeats(gen, count: int, run=None) -> int:
    """Train ``count`` seeds of ``gen``'s job; returns 0, or the first failing run's exit code."""
    if count < 1:
        raise JobError(gen.job.where, f"--repeat {count} asks for no run", "give 1 or more")
    if run is None:
        from .launch import run
    base = Path(gen.output)
    seeds = [gen.seed + i for i in range(count)]
    repeats = {"count": count, "seeds": seeds, "summary": str(base / "repeats.csv")}
    results, status, code = {}, {}, 0
    for index, seed in enumerate(seeds):
        g = seed_generator(gen, seed)
        done = mf.read(g.output) or {}
        same = done.get("job", {}).get("sha256") == mf.job_record(gen)["sha256"] and \
            done.get("job", {}).get("overrides") == dict(g.job.overrides)
        if same and done.get("status") == "completed" and \
                int(done.get("final_metrics", {}).get("epoch", -1)) + 1 >= gen.hyperparameters.end_epoch:
            print(f"autocnnp: seed {seed} finished already ({g.output})", flush=True)
            rc = 0
        else:
            print(f"autocnnp: repeat {index + 1}/{count}: seed {seed} -> {g.output}", flush=True)
            rc = run(g)
        record = mf.read(g.output) or {}
        mf.update(g.output, repeats={**repeats, "index": index})
        results[seed] = mf.final_metrics(g.output)
        status[seed] = record.get("status", "completed" if rc == 0 else f"exit {rc}")
        if rc != 0:
            code = code or rc
            if rc != DIVERGED:  # a diverged seed is a result; anything else stops the set
                break
    finished = {s: r for s, r in results.items() if r}
    summary = summarise(finished)
    table = write_summary(base / "repeats.csv", finished, status, summary)
    mf.write(base, {"autocnnp_manifest": mf.FORMAT, "kind": "repeat set", "updated": mf.now(),
                    "job": mf.job_record(gen), "plan": mf.plan_record(gen), "repeats": repeats,
                    "runs": {str(s): str(base / f"seed-{s}") for s in seeds}, "status": status,
                    "summary": summary, "standard_deviation": "sample (n - 1)"})
    if summary:
        print(format_summary(finished, summary))
    print(f"wrote {table}")
    return code
