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
from pathlib import Path

from ..core.errors import ExitCode, JobError
from ..core.files import atomic_write, write_json
from ..core.metrics import LOSSES, SEGEVAL
from ..core.text import text_table
from . import launch
from . import manifest as mf
from .job import Job

SUMMARY_METRICS = (*SEGEVAL, *reversed(LOSSES))


def seed_job(job: Job, seed: int) -> Job:
    """``job`` for one repeat: its seed, its own output folder (passed on to the workers as overrides)."""
    out = job.rundir.seed(seed)
    return job.variant({"seed": str(seed), "output": str(out)})


def summarise(results: dict[int, dict], per_class: bool = False) -> dict[str, dict[str, float]]:
    """metric -> {"mean", "std", "n"} over the runs that finished (std: sample, n - 1; NaN for n = 1); with
    ``per_class`` also every class's and region's metric (``dice/edema``)."""
    out = {}
    names = [m for m in SUMMARY_METRICS if any(m in r for r in results.values())]
    if per_class:
        names += sorted({m for r in results.values() for m in r if "/" in m})
    for name in names:
        values = [float(r[name]) for r in results.values() if r.get(name) not in (None, "")]
        values = [v for v in values if math.isfinite(v)]
        if values:
            out[name] = {"mean": statistics.fmean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else math.nan, "n": len(values)}
    return out


def write_summary(path: Path, results: dict[int, dict], status: dict[int, str], summary: dict, key: str = "seed"):
    """The table of the runs (one row per ``key``: seed or fold) then ``mean`` and ``std`` into CSV ``path``."""
    names = list(summary) or list(SUMMARY_METRICS)
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow([key, "status", "epochs", *names])
    for seed, r in results.items():
        w.writerow([seed, status.get(seed, ""), r.get("epoch", -1) + 1 if "epoch" in r else "",
                    *[repr(float(r[n])) if n in r else "" for n in names]])
    for stat in ("mean", "std"):
        w.writerow([stat, "", "", *[repr(summary[n][stat]) if n in summary else "" for n in names]])
    return atomic_write(path, text.getvalue())


def format_summary(results: dict[int, dict], summary: dict, key: str = "seed") -> str:
    seeds = list(results)
    head = ["metric", "mean", "std", *[f"{key} {s}" for s in seeds]]
    rows = [[n, f"{v['mean']:.4f}", "" if math.isnan(v["std"]) else f"{v['std']:.4f}",
             *[f"{float(results[s][n]):.4f}" if n in results[s] else "" for s in seeds]] for n, v in summary.items()]
    return text_table(head, rows, rule=True)


def finished(one: Job, manifest: dict | None = None) -> bool:
    """Whether ``one`` (a variant of a set's job) completed all its epochs in its folder, with this job file and
    these overrides (a run of a set then is not trained again); ``manifest``: its manifest, where read already."""
    done = (mf.read(one.rundir) if manifest is None else manifest) or {}
    same = done.get("job", {}).get("sha256") == mf.job_record(one.spec)["sha256"] and \
        done.get("job", {}).get("overrides") == dict(one.spec.overrides)
    return same and done.get("status") == "completed" and \
        int(done.get("final_metrics", {}).get("epoch", 0)) >= one.generator.hyperparameters.end_epoch  # from 1


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
        if finished(one):
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
    done = {s: r for s, r in results.items() if r}
    report_set(job, "repeat set", done, status, {str(s): str(base.seed(s)) for s in seeds}, base.repeats,
               repeats=repeats)
    return code


def report_set(job: Job, kind: str, done: dict[int, dict], status: dict[int, str], runs: dict[str, str], table: Path,
               key: str = "seed", per_class: bool = False, **record) -> None:
    """The summary of a set of runs of ``job`` (a repeat set, a study; one per ``key``) over those ``done``: the
    CSV ``table``, the set's manifest (its ``kind``, ``record`` and ``runs``) and the table on the console."""
    summary = summarise(done, per_class)
    written = write_summary(table, done, status, summary, key)
    write_json(job.rundir.manifest, {"autocnnp_manifest": mf.FORMAT, "kind": kind, "updated": mf.now(),
                                     "job": mf.job_record(job.spec), "plan": mf.plan_record(job), **record,
                                     "runs": runs, "status": status, "summary": summary,
                                     "standard_deviation": "sample (n - 1)"})
    if summary:
        print(format_summary(done, summary, key))
    print(f"wrote {written}")
