"""``autocnnp tune`` (the GreScale guideline, thesis Figure 6.3) and ``autocnnp lr-plot``.

* ``autocnnp tune JOB.xml [--out DIR] [--budget N] [--ranks-threshold 12] [--baseline RUN_DIR] ...``
* ``autocnnp lr-plot JOB.xml [--out PNG] [--policy NAME ...] [--ranks N] [--metrics metrics.csv]``

Heavy modules (torch, matplotlib) are imported inside the command functions.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from ..core.cli_args import positive
from ..core.errors import ExitCode, JobError
from ..core.files import read_json, write_json
from ..core.rundir import RunDir
from ..generator.overrides import degree_overrides
from ..run.job import load_job
from ..run.manifest import final_metrics, now
from . import report
from .guideline import DEFAULT_THRESHOLD, Guideline, Steps, default_settings
from .lr_plot import ASSUMED_STEPS, actual_lr, plot_schedules, steps_per_epoch
from .runner import JobRunner, RunFailed

STATE = "state.json"


def add_commands(sub) -> None:
    s = sub.add_parser("tune", help="tune GreScale for the job's ranks following the thesis guideline (Figure 6.3)",
                       description="Start from the GreScale defaults (SGD, lr 1e-5, 5-epoch warmup). Below "
                       "--ranks-threshold ranks just train; from it on walk the five ordered actions (decrease "
                       "the initial lr, increase the decay coefficient, increase the warmup period, increase "
                       "the decay-phase period, change the optimizer) until a run reaches the single-rank "
                       "baseline (Dice, then mean accuracy, then mean IoU), then confirm with one more run. "
                       "Writes tune.csv, tune.png and state.json in the tune folder; running again resumes.")
    s.add_argument("job", help="the XML job file")
    s.add_argument("--out", help="tune folder (default: the job's output folder/tune)")
    s.add_argument("--budget", type=int, help="at most this many training runs, baseline included")
    s.add_argument("--ranks-threshold", type=int, default=DEFAULT_THRESHOLD,
                   help=f"tune from this many ranks on (thesis: {DEFAULT_THRESHOLD}); below it, just train")
    s.add_argument("--processes", type=positive, help="real processes each run starts (default: the job's "
                   "parallelism-degree), each emulating the job's ranks / PROCESSES virtual ranks")
    s.add_argument("--baseline", metavar="RUN_DIR", help="use this finished single-rank run's metrics.csv as the "
                   "baseline instead of training one")
    s.add_argument("--tolerance", type=float, default=Guideline.tolerance,
                   help=f"metric differences up to this are ties (the next metric decides); default {Guideline.tolerance}")
    s.add_argument("--from-job", action="store_true", help="start from the job's lr, optimizer and GreScale "
                   "settings instead of the thesis defaults")
    s.add_argument("--revert-worse", action="store_true",
                   help="undo a step that made the model worse before moving to the next action")
    s.add_argument("--lr-factor", type=float, default=Steps.lr_factor,
                   help=f"decrease the initial lr: lr x this ({Steps.lr_factor})")
    s.add_argument("--min-lr", type=float, default=Steps.min_lr, help=f"never below this initial lr (thesis: {Steps.min_lr})")
    s.add_argument("--decay-step", type=float, default=Steps.decay_step,
                   help=f"increase the decay coefficient by this ({Steps.decay_step})")
    s.add_argument("--warmup-step", type=int, default=Steps.warmup_step,
                   help=f"epochs added to the warmup ({Steps.warmup_step})")
    s.add_argument("--decay-epochs-step", type=int, default=Steps.decay_epochs_step,
                   help=f"epochs added to the decay stage ({Steps.decay_epochs_step})")
    s.add_argument("--restart", action="store_true", help="forget the saved state and start afresh")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the job for every run (e.g. hyperparameters.end_epoch=30)")
    s.set_defaults(func=cmd_tune)

    p = sub.add_parser("lr-plot", aliases=["plot-lr"], help="plot the job's learning-rate schedule",
                       description="Plot the LR policy of a job (or any registered policy, --policy, with the "
                       "job's lr, ranks and epochs) per optimizer step.")
    p.add_argument("job", help="the XML job file")
    p.add_argument("--out", help="PNG file (default: the job's output folder/plots/lr_schedule.png)")
    p.add_argument("--policy", action="append", default=[], metavar="NAME",
                   help="plot this registered policy instead (repeat to compare; 'job' is the job's own)")
    p.add_argument("--ranks", type=int, help="number of ranks (default: the job's parallelism-degree)")
    p.add_argument("--steps-per-epoch", type=int, help="optimizer steps per epoch (default: from the dataset "
                   "size where known without loading it, else 10)")
    p.add_argument("--metrics", metavar="CSV", help="a run's metrics.csv: mark the lr it really used")
    p.add_argument("--log", action="store_true", help="logarithmic lr axis")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the job")
    p.set_defaults(func=cmd_lr_plot)


def cmd_lr_plot(args) -> int:
    gen = load_job(args.job, args.set).generator
    world_size = args.ranks or gen.ranks
    if world_size < 1:
        raise JobError(gen.spec.where, f"--ranks {world_size} is not a number of ranks", "give 1 or more")
    steps = args.steps_per_epoch or steps_per_epoch(gen, world_size)
    note = "" if steps else " (assumed: pass --steps-per-epoch)"
    steps = steps or ASSUMED_STEPS
    policies = {}
    for name in args.policy or ["job"]:
        try:
            policy = gen.lr_policy(steps, world_size, None if name == "job" else name)
        except ValueError as exc:
            raise JobError(gen.spec.where, f"lr_policy '{name}': {exc}", "fix the policy's parameters") from None
        label = gen.action("lr_policy").entry.name if name == "job" else name
        policies[label] = policy
        print(f"{label}: {policy.describe()}")
    out = Path(args.out) if args.out else gen.rundir.plots / "lr_schedule.png"
    actual = actual_lr(Path(args.metrics)) if args.metrics else None
    hp = gen.hyperparameters
    title = (f"{gen.spec.file.name}: base lr {hp.lr:g}, {world_size} rank(s) ({gen.replicas(world_size)} replica(s) per step), "
             f"{hp.end_epoch} epochs, {steps} steps/epoch{note}")
    plot_schedules(policies, hp.end_epoch, steps, out, title, actual, args.log)
    print(f"wrote {out}")
    return 0


def _initial(gen, from_job: bool):
    total = gen.hyperparameters.end_epoch
    if not from_job:
        return default_settings(total)
    action = gen.action("lr_policy")
    return default_settings(total, gen.hyperparameters, action.config if action.entry.name == "grescale" else None)


def cmd_tune(args) -> int:
    gen = load_job(args.job, args.set).generator
    sets = gen.spec.overrides
    job_file = Path(gen.spec.file)
    sha = hashlib.sha256(job_file.read_bytes()).hexdigest()
    out = Path(args.out).resolve() if args.out else gen.rundir.tune
    state_path = out / STATE
    state = None if args.restart else _load(state_path)
    if state is not None and state.get("job_sha256") != sha:
        raise JobError(job_file, f"the job file changed since the tune in {out} began",
                       "pass --restart to start the tune afresh, or --out another folder")
    if args.budget is not None and args.budget < 1:
        raise JobError(job_file, f"--budget {args.budget} allows no run", "give 1 or more")
    processes = args.processes or gen.world_size
    try:
        degree_overrides(gen.ranks, processes)  # each run's, checked before the first
    except ValueError as exc:
        raise JobError(job_file, f"--processes: {exc}", f"give a divisor of {gen.ranks}") from None
    baseline = None
    if args.baseline:
        baseline = final_metrics(RunDir(Path(args.baseline)))
        if not baseline:
            raise JobError(Path(args.baseline), "no metrics.csv with a finished epoch here",
                           "point --baseline at the output folder of a finished single-rank run")
    try:
        steps = Steps(lr_factor=args.lr_factor, decay_step=args.decay_step, warmup_step=args.warmup_step,
                      decay_epochs_step=args.decay_epochs_step, min_lr=args.min_lr)
        initial = _initial(gen, args.from_job)
    except ValueError as exc:
        raise JobError(job_file, str(exc), "check the job's epochs and GreScale settings") from None
    if not (0 < steps.lr_factor < 1) or steps.decay_step <= 0 or steps.warmup_step < 1 or steps.decay_epochs_step < 1:
        raise JobError(job_file, "a tuning step does not move (need 0 < --lr-factor < 1, --decay-step > 0, "
                       "--warmup-step >= 1, --decay-epochs-step >= 1)", "fix the step options")
    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "restart")}
    record = {"autocnnp_tune": 1, "job": str(job_file), "job_sha256": sha, "options": options,
              "cache": dict((state or {}).get("cache", {}))}

    def save(variant=None, metrics=None, cached=False):
        record["updated"] = now()
        write_json(state_path, record)

    guideline = Guideline(JobRunner(job_file, out / "runs", sha, sets), world_size=gen.ranks, processes=processes,
                          total_epochs=gen.hyperparameters.end_epoch, initial=initial, seed=gen.seed,
                          threshold=args.ranks_threshold, budget=args.budget, tolerance=args.tolerance, steps=steps,
                          revert_worse=args.revert_worse, baseline_metrics=baseline, cache=record["cache"],
                          on_run=save)
    save()
    try:
        outcome = guideline.walk()
    except RunFailed as exc:
        print(f"autocnnp: {exc}", file=sys.stderr)
        return exc.exit_code
    record.update(status=outcome.status, finished=outcome.finished, runs=outcome.runs, branch=outcome.branch,
                  best=None if outcome.best is None else {"iteration": outcome.best.iteration,
                                                          "metrics": outcome.best.metrics,
                                                          "overrides": outcome.best.settings.overrides()
                                                          if outcome.best.settings else {}})
    save()
    table = report.write_csv(outcome, out / "tune.csv")
    figure = report.plot(outcome, out / "tune.png")
    print(report.format_table(outcome))
    print(f"\n{outcome.status} ({outcome.runs} run(s))")
    if outcome.best is not None and outcome.best.settings is not None:
        print("best settings: " + " ".join(f"--set {k}={v}" for k, v in outcome.best.settings.overrides().items()))
    print(f"wrote {table}" + (f", {figure}" if figure else "") + f", {state_path}")
    return ExitCode.OK


def _load(path: Path) -> dict | None:
    if not path.exists():
        return None
    state = read_json(path)
    if state is None:
        raise JobError(path, "the tune state is unreadable", "pass --restart to start afresh")
    return state
