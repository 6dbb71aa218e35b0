"""``autocnnp study JOB.xml``: k-fold cross-validation, every fold an ordinary run of the job.

The job names its folds (``<data>`` ``folds`` and ``split_seed``; ``--folds K`` overrides). The study writes
the split once into ``OUTPUT/folds.json`` (by case, stratified by the classes a case holds; a split already
there is reused, and refused if the data changed since) and trains fold F as the job variant
``output=OUTPUT/fold-F data.fold=F data.split=OUTPUT/folds.json``: its own run folder, lock, manifest,
checkpoints and resume, its trackers' runs children of the study's. As many folds run at once as the slots
hold (slots // parallelism-degree: the hostfile's, the Slurm allocation's or this machine's cores;
``--at-once N`` overrides), each an independent MPI group; ``--submit`` queues one Slurm job per fold
instead. Running the command again trains only the folds not finished (``--fold F`` picks them); the summary
(``OUTPUT/folds.csv`` and the console table) gives every metric's mean and sample standard deviation over
the finished folds, per class.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ..core.errors import ExitCode, JobError
from ..data import folds as splits
from . import manifest as mf
from . import preflight, slurm
from .job import Job
from .manifest import PARENT_RUN
from .processes import start, stop_session
from .repeat import finished, report_set


def fold_job(job: Job, fold: int) -> Job:
    """The job variant that trains ``fold`` of the study in ``job``'s output folder."""
    base = job.rundir
    return job.variant({"output": str(base.fold(fold)), "data.fold": str(fold), "data.split": str(base.folds_split)})


def study_job(job: Job, k: int | None) -> tuple[Job, int]:
    """The job with ``k`` folds (None: the job's own ``folds``), checked, and its number of folds."""
    config = job.generator.data_format().config
    where = job.generator.action("dataset_injection").where or job.spec.where
    if not hasattr(config, "folds"):
        raise JobError(where, f"the {job.generator.action('dataset_injection').entry.name} data format has no k-fold "
                       "split", "use <data format=\"decathlon\"> (or a format with a folds setting)")
    if k is not None:
        job = job.variant({"data.folds": str(k)})
        config = job.generator.data_format().config
    if config.folds < 2:
        raise JobError(where, f"the job names {config.folds} folds", "set <param name=\"folds\">5</param> in <data> "
                       "or pass --folds 5")
    if config.valid is not None:
        raise JobError(where, "the job names a <valid> dataset and folds", "drop <valid>: each fold holds out its "
                       "own share of the training cases")
    return job, config.folds


def at_once(job: Job, asked: int | None, count: int) -> int:
    """How many folds train at the same time: ``asked``, else as many groups of the job's ranks as slots offer."""
    if asked is not None:
        if asked < 1:
            raise JobError(job.spec.where, f"--at-once {asked} runs no fold", "give 1 or more")
        return min(asked, count)
    offered, _ = preflight.slots(job, os.environ)
    return max(1, min(count, offered // max(1, job.world_size)))


def run_study(job: Job, k: int | None = None, only: list[int] | None = None, parallel: int | None = None,
              submit: bool = False) -> int:
    """Train the folds of the study of ``job`` (those not finished, or ``only``); returns 0 or the first
    failing fold's exit code."""
    job, k = study_job(job, k)
    base = job.rundir
    config = job.generator.data_format().config
    base.root.mkdir(parents=True, exist_ok=True)
    split = splits.write_split(base.folds_split, Path(config.train), k, config.split_seed)
    wanted = sorted(set(only)) if only else list(range(k))
    for fold in wanted:
        if not 0 <= fold < k:
            raise JobError(job.spec.where, f"--fold {fold} is not one of the study's folds 0 .. {k - 1}",
                           f"give a fold from 0 to {k - 1}")
    jobs = {fold: fold_job(job, fold) for fold in range(k)}
    records = {fold: mf.read(one.rundir) or {} for fold, one in jobs.items()}  # each fold's manifest, read once
    todo = [fold for fold in wanted if not finished(jobs[fold], records[fold])]
    if submit:
        for fold in todo:
            print(f"autocnnp: fold {fold}:", end=" ", flush=True)
            slurm.submit(jobs[fold])
        return ExitCode.OK
    for fold in sorted(set(wanted) - set(todo)):
        print(f"autocnnp: fold {fold} finished already ({jobs[fold].rundir})", flush=True)
    groups = at_once(job, parallel, len(todo)) if todo else 1
    if todo:
        print(f"autocnnp: study of {k} folds: training fold(s) {', '.join(map(str, todo))}, {groups} at once "
              f"({job.world_size} rank(s) each)", flush=True)
    codes = _train(job, {fold: jobs[fold] for fold in todo}, groups)
    records.update({fold: mf.read(jobs[fold].rundir) or {} for fold in codes})  # as the trained folds left them
    return _summarise(job, k, split, jobs, records, codes)


def _command(one: Job) -> list[str]:
    """``autocnnp run`` of one fold (the job variant travels as ``--set`` overrides)."""
    return [sys.executable, "-m", "autocnnp", "run", str(one.spec.file),
            *[f"--set={key}={value}" for key, value in one.spec.overrides.items()]]


def _train(job: Job, todo: dict[int, Job], groups: int) -> dict[int, int]:
    """Run the folds ``todo``, ``groups`` at a time, each in a session of its own (stopped with the study);
    with one at a time its output goes to the console, else to ``OUTPUT/logs/fold-F.log``."""
    env = {**os.environ, PARENT_RUN: str(job.rundir.root)}
    waiting, running, codes = list(todo), {}, {}
    logs = job.rundir.logs
    try:
        while waiting or running:
            while waiting and len(running) < groups:
                fold = waiting.pop(0)
                if groups == 1:
                    running[fold] = (start(_command(todo[fold]), env), None)
                else:
                    logs.mkdir(parents=True, exist_ok=True)
                    log = open(logs / f"fold-{fold}.log", "ab")
                    running[fold] = (start(_command(todo[fold]), env, stdout=log, stderr=log), log)
                    print(f"autocnnp: fold {fold} started (log: {log.name})", flush=True)
            for fold, (proc, log) in list(running.items()):
                if proc.poll() is not None:
                    codes[fold] = proc.returncode
                    del running[fold]
                    if log is not None:
                        log.close()
                        print(f"autocnnp: fold {fold} ended: exit {proc.returncode}", flush=True)
            time.sleep(0.2)
    finally:  # interrupted or failed: each fold's run & manage stops its ranks in its grace, then its session goes
        for proc, log in running.values():
            stop_session(proc, 2 * job.launch.stop_grace_s + 5.0)
            if log is not None:
                log.close()
    return codes


def _summarise(job: Job, k: int, split: dict, jobs: dict[int, Job], records: dict[int, dict],
               codes: dict[int, int]) -> int:
    """The study's summary table and manifest from the folds' manifests (``records``); the exit code: the first
    failed fold's."""
    base = job.rundir
    results, status = {}, {}
    for fold, one in jobs.items():
        results[fold] = mf.final_metrics(one.rundir)
        code = codes.get(fold)
        status[fold] = records[fold].get("status") or ("not run" if code is None else f"exit {code}")
    done = {fold: r for fold, r in results.items() if r and finished(jobs[fold], records[fold])}
    report_set(job, "study", done, status, {str(f): str(one.rundir) for f, one in jobs.items()}, base.folds_summary,
               key="fold", per_class=True, folds={"k": k, "seed": split["seed"], "split": str(base.folds_split)})
    failed = [f for f, c in codes.items() if c != ExitCode.OK]
    if failed:
        print(f"autocnnp: fold(s) {', '.join(map(str, failed))} failed; run the same command again to train them "
              f"alone (finished folds are kept), or --fold {failed[0]}", file=sys.stderr, flush=True)
        return codes[failed[0]]
    missing = [f for f in range(k) if f not in done]
    return ExitCode.FAILED if missing and not codes else ExitCode.OK
