"""Cluster commands of the ``autocnnp`` CLI: submit, status, cancel (Slurm), deploy (shared folder, swarm).

``add_commands(sub)`` adds them to the CLI's sub-parsers; nothing here imports torch.

* ``autocnnp submit JOB.xml [--nodes N --tasks-per-node T --cpus-per-task C --gpus-per-task G
  --time HH:MM:SS --partition P --account A --mem M --exclusive --job-name NAME --launcher mpirun|srun
  --set KEY=VALUE --dry-run]``
* ``autocnnp status JOB.xml|JOBID [--set KEY=VALUE] [--wait --timeout S]``
* ``autocnnp cancel JOB.xml|JOBID [--set KEY=VALUE]``
* ``autocnnp deploy JOB.xml --to DIR [--with-package] [--dry-run]``
* ``autocnnp deploy JOB.xml --swarm [--image IMAGE] [--to DIR]``
* ``autocnnp study JOB.xml [--folds K] [--fold F ...] [--at-once N] [--submit] [--set KEY=VALUE]`` (k-fold)
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..core.errors import ExitCode
from ..core.files import read_json
from ..core.rundir import RunDir
from . import slurm
from .deploy import deploy
from .job import load_job
from .lock import is_held
from .swarm import run_swarm

# command-line option -> <cluster> property of `autocnnp submit`
SUBMIT_OPTIONS = (("nodes", int, "nodes to allocate"),
                  ("tasks_per_node", int, "ranks per node (default: ranks / nodes, rounded up)"),
                  ("cpus_per_task", int, "CPU cores per rank"),
                  ("gpus_per_task", int, "GPUs per rank"),
                  ("time_limit", str, "wall-clock limit (minutes, HH:MM:SS or D-HH:MM:SS)"),
                  ("partition", str, "Slurm partition (default: the cluster's default one)"),
                  ("account", str, "account to charge"),
                  ("mem", str, "memory per node (e.g. 32G)"),
                  ("exclusive", bool, "whole nodes for this job alone"),
                  ("job_name", str, "Slurm job name (default: autocnnp-<job file name>)"),
                  ("launcher", str, "how the batch script starts the ranks: mpirun (default) or srun"))


def cmd_submit(args) -> int:
    # a job variant (--set) is checked here and passed on to `autocnnp run` in the batch script
    job = load_job(args.job, args.set)
    job = job.with_cluster({name: getattr(args, name) for name, _, _ in SUBMIT_OPTIONS}, flags={"time_limit": "--time"})
    slurm.submit(job, dry_run=args.dry_run)
    return 0


def _describe(job_id: str, rundir: RunDir | None, state) -> str:
    text = f"Slurm job {job_id}: {state.state}"
    if state.exit_code and not state.active:
        text += f" (exit code {state.exit_code})"
    if state.elapsed:
        text += f", {'running for' if state.active else 'ran'} {state.elapsed}"
    if state.nodes and state.nodes != "(null)":
        text += f" on {state.nodes}"
    if state.reason and state.reason != "None":
        text += f", reason: {state.reason}"
    if state.state == "UNKNOWN":
        text += " (Slurm no longer knows this job and it left no exit code)"
    done = slurm.progress(rundir)
    if done:
        text += f"\n  progress: {done}"
    if rundir is not None:
        record = read_json(rundir.slurm_record) or {}
        text += f"\n  output: {rundir}" + (f"\n  log: {record['log']}" if record.get("log") else "")
    return text


def cmd_status(args) -> int:
    job_id, rundir = slurm.find_job(args.target, args.set)
    state = slurm.wait(job_id, rundir, args.timeout, poll_s=2.0) if args.wait else slurm.job_state(job_id, rundir)
    print(_describe(job_id, rundir, state))
    if not args.wait:
        return 1 if state.state == "UNKNOWN" else 0
    if state.active:
        print(f"autocnnp: Slurm job {job_id} is still {state.state} after {args.timeout:g} s", file=sys.stderr)
        return ExitCode.TIMED_OUT
    return 0 if state.state == "COMPLETED" else 1


def cmd_cancel(args) -> int:
    job_id, rundir = slurm.find_job(args.target, args.set)
    before, after = slurm.cancel(job_id, rundir)
    if not before.active:
        print(f"Slurm job {job_id} is not queued or running ({before.state}); nothing to cancel")
        return 0
    print(f"cancelled Slurm job {job_id} (was {before.state}, now {after.state})")
    if rundir is not None and is_held(rundir):
        print(f"autocnnp: the job's run & manage still holds {rundir} (ranks still ending?)", file=sys.stderr)
        return 1
    return 0 if not after.active else 1


def cmd_deploy(args) -> int:
    job_file = args.job
    if args.to or not args.swarm:
        job_file = deploy(args.job, args.to, with_package=args.with_package, dry_run=args.dry_run)
    if not args.swarm:
        return 0
    return run_swarm(load_job(args.job if args.dry_run else job_file), args.image, timeout_s=args.timeout,
                     dry_run=args.dry_run)


def cmd_study(args) -> int:
    from .study import run_study

    return run_study(load_job(args.job, args.set), args.folds, args.fold, args.at_once, args.submit)


def _add_set(s) -> None:
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the job as `autocnnp run --set` does (repeatable); status and cancel take the "
                        "overrides it was submitted with")


def add_commands(sub) -> None:
    s = sub.add_parser("submit", help="submit the job to Slurm (sbatch); nothing is queued if a check fails",
                       description="Render templates/sbatch.sh for the job (resources from its <cluster> section, "
                       "overridden by the options) and submit it with sbatch. The job id is kept in "
                       "<output>/slurm/job.json for status and cancel.")
    s.add_argument("job", help="the XML job file")
    for name, tp, doc in SUBMIT_OPTIONS:
        flag = "--time" if name == "time_limit" else "--" + name.replace("_", "-")
        if tp is bool:
            s.add_argument(flag, dest=name, action="store_const", const=True, help=doc)
        else:
            s.add_argument(flag, dest=name, type=tp, help=doc)
    _add_set(s)
    s.add_argument("--dry-run", action="store_true", help="print the sbatch script; check and submit nothing")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("status", help="state of the job's Slurm job (and its training progress)")
    s.add_argument("target", help="the XML job file that was submitted, or a Slurm job id")
    _add_set(s)
    s.add_argument("--wait", action="store_true", help="wait until the job ends; exit 0 only if it COMPLETED")
    s.add_argument("--timeout", type=float, default=24 * 3600.0,
                   help=f"seconds --wait waits at most (then exit {ExitCode.TIMED_OUT:d})")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("cancel", help="cancel the job's Slurm job (scancel) and wait until its ranks are gone")
    s.add_argument("target", help="the XML job file that was submitted, or a Slurm job id")
    _add_set(s)
    s.set_defaults(func=cmd_cancel)

    s = sub.add_parser("study", help="k-fold cross-validation: train every fold of the job (at once where the slots "
                       "allow) and summarise them", description="Split the training cases into the job's folds "
                       "(<data> folds, split_seed) once, into OUTPUT/folds.json, and train fold F in OUTPUT/fold-F as "
                       "an ordinary run; then write OUTPUT/folds.csv: every metric's mean and standard deviation over "
                       "the folds, per class. Running it again trains only the folds not finished.")
    s.add_argument("job", help="the XML job file")
    s.add_argument("--folds", type=int, metavar="K", help="the number of folds (default: the job's <data> folds)")
    s.add_argument("--fold", type=int, action="append", metavar="F", help="train only this fold (repeatable)")
    s.add_argument("--at-once", type=int, metavar="N", help="folds trained at the same time (default: as many "
                   "groups of parallelism-degree ranks as the slots hold)")
    s.add_argument("--submit", action="store_true", help="queue one Slurm job per fold (sbatch) instead")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the job as `autocnnp run --set` does (repeatable)")
    s.set_defaults(func=cmd_study)

    s = sub.add_parser("deploy", help="copy the job and its user files (and autocnnp) to a shared folder, "
                       "keyed by content: unchanged files are not copied again")
    s.add_argument("job", help="the XML job file")
    s.add_argument("--to", type=Path, help="the shared folder (default: the job's <cluster> deploy_dir)")
    s.add_argument("--with-package", action="store_true",
                   help="also deploy the autocnnp package (nodes then run it with PYTHONPATH=DIR/lib)")
    s.add_argument("--dry-run", action="store_true", help="print what would be copied or skipped; write nothing")
    s.add_argument("--swarm", action="store_true", help="run the job as a Docker swarm service of "
                   "parallelism-degree replicas (rank = task slot - 1) and wait for it; with --to, the deployed copy")
    s.add_argument("--image", default="autocnnp:latest", help="the runtime image for --swarm "
                   "(built from cluster/docker/Dockerfile; default autocnnp:latest)")
    s.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds --swarm waits for the job at most")
    s.set_defaults(func=cmd_deploy)
