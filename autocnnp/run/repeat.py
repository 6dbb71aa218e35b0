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
import io
import math
import statistics

from ..core.errors import ExitCode, JobError
from ..core.files import atomic_write, write_json
from ..core.metrics import LOSSES, SEGEVAL
from ..core.rundir import RunDir
from ..core.text import text_table
from ..generator.overrides import apply_overrides
from . import launch
from . import manifest as mf
from .job import Job, load_job

SUMMARY_METRICS = (*SEGEVAL, *reversed(LOSSES))


def seed_job(job: Job, seed: int) -> Job:
    """``job`` for one repeat: its seed, its own output folder (passed on to the workers as overrides)."""
    out = job.rundir.seed(seed)
    return load_job(apply_overrides(job.spec, {"seed": str(seed), "output": str(out)}))


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


def write_summary(rundir: RunDir, results: dict[int, dict], status: dict[int, str], summary: dict):
    names = list(summary) or list(SUMMARY_METRICS)
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["seed", "status", "epochs", *names])
    for seed, r in results.items():
        w.writerow([seed, status.get(seed, ""), r.get("epoch", -1) + 1 if "epoch" in r else "",
                    *[repr(float(r[n])) if n in r else "" for n in names]])
    for stat in ("mean", "std"):
        w.writerow([stat, "", "", *[repr(summary[n][stat]) if n in summary else "" for n in names]])
    return atomic_write(rundir.repeats, text.getvalue())


def format_summary(results: dict[int, dict], summary: dict) -> str:
    seeds = list(results)
    head = ["metric", "mean", "std", *[f"seed {s}" for s in seeds]]
    rows = [[n, f"{v['mean']:.4f}", "" if math.isnan(v["std"]) else f"{v['std']:.4f}",
             *[f"{float(results[s][n]):.4f}" if n in results[s] else "" for s in seeds]] for n, v in summary.items()]
    return text_table(head, rows, rule=True)


def run_repeats(job: Job, count: int, run=None) -> int:
    """Train ``count`` seeds of ``job``; returns 0, or the first failing run's exit code."""
    if count < 1:
        raise JobError(job.spec.where, f"--repeat {count} asks for no run", "give 1 or more")
    run = run or launch.run
    gen, base = job.generator, job.rundir
    seeds = [gen.seed + i for i in range(count)]
    repeats = {"count": count, "seeds": seeds, "summary": str(base.repeats)}
    results, status, code = {}, {}, ExitCode.OK
    for index, seed in enumerate(seeds):
        one = seed_job(job, seed)
        out = one.generator.rundir
        done = mf.read(out) or {}
        same = done.get("job", {}).get("sha256") == mf.job_record(job.spec)["sha256"] and \
            done.get("job", {}).get("overrides") == dict(one.spec.overrides)
        if same and done.get("status") == "completed" and \
                int(done.get("final_metrics", {}).get("epoch", 0)) >= gen.hyperparameters.end_epoch:  # from 1
            print(f"autocnnp: seed {seed} finished already ({out})", flush=True)
            rc = ExitCode.OK
        else:
            print(f"autocnnp: repeat {index + 1}/{count}: seed {seed} -> {out}", flush=True)
            with launch.parent_run(base.root):
                rc = run(one)
        record = mf.read(out) or {}
        mf.update(out, repeats={**repeats, "index": index})
        results[seed] = mf.final_metrics(out)
        status[seed] = record.get("status", "completed" if rc == 0 else f"exit {rc}")
        if rc != 0:
            code = code or rc
            if rc != ExitCode.DIVERGED:  # a diverged seed is a result; anything else stops the set
                break
    finished = {s: r for s, r in results.items() if r}
    summary = summarise(finished)
    table = write_summary(base, finished, status, summary)
    write_json(base.manifest, {"autocnnp_manifest": mf.FORMAT, "kind": "repeat set", "updated": mf.now(),
                               "job": mf.job_record(job.spec), "plan": mf.plan_record(job), "repeats": repeats,
                               "runs": {str(s): str(base.seed(s)) for s in seeds}, "status": status,
                               "summary": summary, "standard_deviation": "sample (n - 1)"})
    if summary:
        print(format_summary(finished, summary))
    print(f"wrote {table}")
    return code
