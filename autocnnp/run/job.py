"""The job as run & manage sees it: the assembled generator plus the ``<cluster>`` and ``<monitoring>``
sections, each bound to the Config of the part that reads it. Loading a job checks all of it; nothing
heavy is imported."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from ..core.errors import JobError, Location
from ..core.files import read_input
from ..core.rundir import RunDir
from ..engine.job import JobSpec
from ..engine.values import bind_section
from ..generator.assemble import Generator, assemble
from ..generator.overrides import apply_overrides, parse_sets, read_variant
from ..generator.points import TRACKERS
from ..training.monitor import MonitoringConfig
from .config import CLUSTER_CONFIGS, DeployConfig, LaunchConfig, SlurmConfig


@dataclass(frozen=True)
class Job:
    """A checked job: the generator and the run-wide settings."""

    generator: Generator
    launch: LaunchConfig
    slurm: SlurmConfig
    deploy: DeployConfig
    monitoring: MonitoringConfig
    trackers: tuple = ()  # (registry entry, bound Config) of every <monitoring> tracker, in the job's order

    @property
    def spec(self) -> JobSpec:
        return self.generator.spec

    @property
    def rundir(self) -> RunDir:
        """The run folder (its generator's)."""
        return self.generator.rundir

    @property
    def world_size(self) -> int:
        """The number of ranks (its generator's)."""
        return self.generator.world_size

    @property
    def output_where(self) -> Location:
        """Where the output folder was named (its <output> line, else the job's)."""
        return self.spec.output.where if self.spec.output else self.spec.where

    def tracker(self, name: str):
        """The bound Config of the job's tracker ``name`` (e.g. ``mlflow``), or None when it has none."""
        return next((config for entry, config in self.trackers if entry.name == name), None)

    def where(self, cluster_property: str) -> Location:
        """Where ``<cluster>`` property ``cluster_property`` was set (a job line or a command-line option)."""
        for s in self.spec.cluster:
            if s.name == cluster_property:
                return s.where
        return self.spec.where

    def variant(self, overrides: dict[str, str]) -> Job:
        """This job with ``overrides`` (``--set KEY=VALUE``), which its ranks get on their command line."""
        return load_job(apply_overrides(self.spec, overrides))

    def build_run(self, beat=lambda: None):
        """The job's framework and this rank's run, built as every rank builds it (its collectives bounded a
        little past run & manage's watchdog)."""
        framework = self.generator.action("framework").build()
        return framework, framework.build(self.generator, self.monitoring, beat=beat,
                                          timeout_s=self.launch.rank_timeout_s + 30)

    def with_cluster(self, values: dict[str, object], flags: dict[str, str] | None = None) -> Job:
        """This job with the given ``<cluster>`` properties replacing the job's (None: keep), typed and checked
        as if written in the job; ``flags`` names the command-line option of a property where it is not
        ``--the-name``. Launcher-side values: not passed on to the workers."""
        texts, labels = {}, {}
        for name, value in values.items():
            if value is None:
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, Path):
                text = str(value.expanduser().resolve())  # relative to where the command runs, not the job
            else:
                text = str(value)
            key = f"cluster.{name}"
            texts[key] = text
            labels[key] = f"{self.spec.file} (command line {(flags or {}).get(name, '--' + name.replace('_', '-'))})"
        return load_job(apply_overrides(self.spec, texts, labels, record=False)) if texts else self


def load_job(source: JobSpec | Path | str, sets: list[str] | None = None) -> Job:
    """Parse, assemble and check a job file (or a parsed spec), with ``--set KEY=VALUE`` overrides."""
    spec = source if isinstance(source, JobSpec) else read_variant(source, parse_sets(sets or []))
    gen = assemble(spec)
    base = spec.base_dir
    launch, slurm, deploy = bind_section(CLUSTER_CONFIGS, spec.cluster, base, "<cluster>")
    entries = _trackers(spec)
    monitoring, *configs = bind_section((MonitoringConfig, *(e.config for e in entries if e.config)), spec.monitoring,
                                        base, "<monitoring>")
    bound = iter(configs)
    job = Job(gen, launch, slurm, deploy, monitoring, tuple((e, next(bound) if e.config else None) for e in entries))
    _check_launcher(job)
    if launch.hostfile is not None:  # a folder, FIFO or device is refused here, not when the ranks start
        read_input(launch.hostfile, job.where("hostfile"), "hostfile")
    return job


def _trackers(spec: JobSpec) -> list:
    """The registry entries of the ``<monitoring>`` tracker property (default: files), each once."""
    setting = next((s for s in spec.monitoring if s.name.lower() == "tracker"), None)
    text = setting.text if setting is not None else next(f.default for f in fields(MonitoringConfig) if f.name == "tracker")
    where = setting.where if setting is not None else spec.where
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names and setting is not None:
        raise JobError(where, "<monitoring> tracker names no tracker", "write files, mlflow or both: files,mlflow")
    return [TRACKERS.get(name, where) for name in names]


def _check_launcher(job: Job) -> None:
    """A strategy declares the launchers that can start its ranks; ``mpirun`` implies ``srun`` (srun
    starts the same MPI ranks over PMIx)."""
    strategy = job.generator.action("dist_strategy")
    launchers = strategy.entry.launchers
    if "mpirun" in launchers:
        launchers = (*launchers, "srun")
    if launchers and job.launch.launcher != "auto" and job.launch.launcher not in launchers:
        raise JobError(strategy.where or job.where("launcher"), f"dist_strategy '{strategy.entry.name}' cannot be "
                       f"started by the '{job.launch.launcher}' launcher",
                       "set <property name=\"launcher\"> to " + " or ".join(launchers))
