"""The Python API: what the ``autocnnp`` commands do, as functions with typed arguments and results, for
notebooks and scripts. ``import autocnnp`` offers every public name here (``autocnnp.load``, ...).

A job is a job file (``str`` or ``Path``) or a :class:`Job` that :func:`load` returned; ``sets`` are the
command line's ``--set`` overrides, as ``"KEY=VALUE"`` strings or a mapping ``{KEY: value}``. Bad input
raises :class:`JobError` or :class:`DataError` (one paragraph: ``file:line:col: problem. Hint: fix.``;
their ``exit_code`` is the command's). Loading, validating and planning never import torch.

>>> import autocnnp
>>> job = autocnnp.load("xml_configs/demo.xml", {"hyperparameters.end_epoch": 1})
>>> autocnnp.validate(job).world_size
2
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .core.errors import DataError, ExitCode, Interrupted, JobError
from .core.rundir import RunDir
from .generator.overrides import parse_sets
from .generator.plan import render
from .run.job import Job, load_job

if TYPE_CHECKING:
    from .inference import EvaluateOptions, Evaluation, Prediction, PredictOptions
    from .tracking.zoo import ZooModel
    from .tuning.scale import ScaleOptions
    from .tuning.scaling import Report as ScaleReport

__all__ = ["DataCheck", "DataError", "EvaluateOptions", "Evaluation", "ExitCode", "Interrupted", "Job", "JobError",
           "Plan", "PredictOptions", "Prediction", "RunResult", "ScaleOptions", "ScaleReport", "Validation",
           "ZooModel", "check_data", "evaluate", "load", "plan", "predict", "scale", "train", "validate", "zoo_fetch",
           "zoo_list", "zoo_publish", "zoo_show"]  # autocnnp.API offers them from the package

# public names of the modules that train, predict, scale or keep the zoo: imported on first use, so that
# load, validate and plan (and ``autocnnp validate``) stay fast
_LAZY = {"EvaluateOptions": (".inference", "EvaluateOptions"), "Evaluation": (".inference", "Evaluation"),
         "Prediction": (".inference", "Prediction"), "PredictOptions": (".inference", "PredictOptions"),
         "ZooModel": (".tracking.zoo", "ZooModel"), "ScaleOptions": (".tuning.scale", "ScaleOptions"),
         "ScaleReport": (".tuning.scaling", "Report")}


def __getattr__(name: str):
    """A public name of a heavier module, imported when first asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = globals()[name] = getattr(importlib.import_module(module, __package__), attr)
    return value


JobSource = Job | str | os.PathLike
Sets = Sequence[str] | Mapping[str, object]


def load(job: JobSource, sets: Sets = ()) -> Job:
    """Parse, assemble and check a job file with overrides (``autocnnp validate``'s checks, no data read):
    ``load("job.xml", {"hyperparameters.lr": 1e-4, "seed": 3})``. A loaded :class:`Job` with ``sets``
    gives that job with further overrides."""
    if isinstance(sets, Mapping):
        sets = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sets.items()]
    if isinstance(job, Job):
        return job.variant(parse_sets(sets)) if sets else job
    return load_job(Path(job), list(sets))


@dataclass(frozen=True)
class DataCheck:
    """Every file of a job's datasets checked (NIfTI readable, shapes, affines, labels): ``ok`` when there
    is no problem; notes are remarks that do not stop a run."""

    files: tuple[Path, ...]
    problems: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Validation:
    """A valid job (an invalid one raises): what it trains, on how many ranks, and its data check."""

    job: Job
    task: str
    world_size: int  #: the parallelism degree: processes x the virtual ranks each emulates
    strategy: str
    architecture: str
    data: DataCheck | None = None  #: None unless validate(data=True)

    @property
    def ok(self) -> bool:
        return self.data is None or self.data.ok


def validate(job: JobSource, sets: Sets = (), *, data: bool = False) -> Validation:
    """Check a job (schema and semantics, ``autocnnp validate``); with ``data``, also every file of its
    datasets (``--data``). Builds nothing and imports no torch."""
    loaded = load(job, sets)
    gen = loaded.generator
    return Validation(loaded, gen.spec.task, gen.ranks, gen.action("dist_strategy").entry.name,
                      gen.action("architecture_injection").entry.name, check_data(loaded) if data else None)


def check_data(job: JobSource, sets: Sets = ()) -> DataCheck:
    """Check every file of the job's datasets (``autocnnp validate --data``)."""
    fmt = load(job, sets).generator.data_format()
    found = fmt.check()
    return DataCheck(tuple(fmt.files()), tuple(map(str, found.problems)), tuple(map(str, found.notes)))


@dataclass(frozen=True)
class Plan:
    """What a run of the job would do: the assembled generator, hyperparameters and launch command as
    ``autocnnp plan`` prints them (``text``), and the command that starts the ranks."""

    text: str
    command: list[str]

    def __str__(self) -> str:
        return self.text


def plan(job: JobSource, sets: Sets = ()) -> Plan:
    """The plan of the job (``autocnnp plan``); starts nothing."""
    from .run import launch

    loaded = load(job, sets)
    command = launch.build_command(loaded)[0]
    return Plan(render(loaded.generator, command), command)


@dataclass(frozen=True)
class RunResult:
    """A finished run: its exit code (README's table: 0 done, 1 failed, 3 diverged, 75 stopped...), the
    outcome its manifest records (completed, failed, diverged, stopped...), its run folder and the final
    metrics (the last row of ``metrics.csv``; with ``repeat``, the mean over the seeds)."""

    exit_code: int
    outcome: str
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)  #: repeat: metric -> mean, std, n

    @property
    def ok(self) -> bool:
        return self.exit_code == ExitCode.OK


def train(job: JobSource, sets: Sets = (), *, repeat: int = 1, launcher: str | None = None) -> RunResult:
    """Train the job as ``autocnnp run`` does: run & manage owns the output folder, checks everything,
    starts the ranks (``mpirun -np <parallelism-degree>``, or ``launcher``: auto, mpirun, srun, inplace),
    watches them and restarts a failed job up to ``max_restarts`` times; ``repeat`` K trains seeds
    seed..seed+K-1 into ``output/seed-<s>/``. A refused job raises (nothing started); a failed or
    diverged training is a result with its exit code; Ctrl-C or SIGTERM stops every rank and raises
    :class:`Interrupted` (``exit_code`` 128+N; the same call resumes from the latest checkpoint)."""
    from .run import launch
    from .run import manifest as mf
    from .run.repeat import run_repeats

    loaded = load(job, sets)
    if launcher:
        loaded = loaded.with_cluster({"launcher": launcher})
    rundir: RunDir = loaded.generator.rundir
    if repeat != 1:
        code = run_repeats(loaded, repeat)
        summary = (mf.read(rundir) or {}).get("summary", {})
        outcome = "completed" if code == ExitCode.OK else f"exit {code}"
        return RunResult(int(code), outcome, rundir.root, {k: v["mean"] for k, v in summary.items()}, summary)
    code = launch.run(loaded)
    outcome = (mf.read(rundir) or {}).get("status") or ("completed" if code == ExitCode.OK else f"exit {code}")
    return RunResult(int(code), outcome, rundir.root, mf.final_metrics(rundir))


def predict(options: PredictOptions) -> Prediction:
    """Segment volumes with a trained network (``autocnnp predict``): a label volume per case, written
    into ``options.out``; prints a line per volume. Imports torch."""
    from . import inference

    return inference.predict(options)


def evaluate(options: EvaluateOptions) -> Evaluation:
    """Score predicted label volumes against references (``autocnnp evaluate``): writes the report and
    returns the per-case, overall and pooled scores."""
    from . import inference

    return inference.evaluate(options)


def scale(options: ScaleOptions) -> ScaleReport:
    """Predict step time, throughput, speedup and efficiency at each rank count (``autocnnp scale``),
    from a profile of the job's step on this machine or from a preset; prints the table."""
    from .tuning import scale as scaling

    return scaling.scale(options)


def zoo_publish(run_dir: Path | str, name: str, *, description: str = "", zoo: str | None = None) -> ZooModel:
    """Register the run's best (else latest) checkpoint as a new version of ``name`` (``autocnnp zoo
    publish``). ``zoo``: a folder or tracking URI, default ``$AUTOCNNP_ZOO``, else ``~/.autocnnp/zoo``."""
    from .tracking import zoo as registry

    version = registry.publish(Path(run_dir), name, registry.zoo_store(zoo), description)
    return registry.show(f"{name}/{version}", registry.zoo_store(zoo))


def zoo_list(zoo: str | None = None) -> list[ZooModel]:
    """The latest version of every model in the zoo (``autocnnp zoo list``)."""
    from .tracking import zoo as registry

    return registry.models(registry.zoo_store(zoo))


def zoo_show(model: str, zoo: str | None = None) -> ZooModel:
    """One model version, ``NAME`` (the latest) or ``NAME/VERSION`` (``autocnnp zoo show``)."""
    from .tracking import zoo as registry

    return registry.show(model, registry.zoo_store(zoo))


def zoo_fetch(model: str, dest: Path | str, zoo: str | None = None) -> Path:
    """Download a model version's files into ``dest`` (``autocnnp zoo pull``); returns its checkpoint."""
    from .tracking import zoo as registry

    name, version = registry.parse(model)
    return registry.fetch(name, version, Path(dest), registry.zoo_store(zoo))[0]
