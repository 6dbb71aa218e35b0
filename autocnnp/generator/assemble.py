"""Assemble the CNN-Parallelism-Generator from a job: resolve every action to an implementation,
bind its typed parameters, check the modules still fit together. Nothing heavy is imported."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..engine.errors import JobError, Location, did_you_mean
from ..engine.job import Choice, JobSpec, Setting, read_job
from ..engine.values import bind, convert
from ..run.config import ClusterConfig, MonitoringConfig
from .points import COMPOSITES, MODULE_BY_NAME, MODULES, POINT_BY_NAME, POINTS, SET_ELSEWHERE
from .registry import ARCHITECTURES, DATASETS, TASKS, Entry
from .tree import Action, Binding, Composite, Module


@dataclass
class Generator:
    """The assembled generator plus the run-wide settings of the job."""

    job: JobSpec
    root: Composite
    bindings: list[Binding]
    degree: int
    seed: int
    output: Path
    monitoring: MonitoringConfig
    cluster: ClusterConfig

    def action(self, type_: str) -> Action:
        for module in self.root.modules():
            for action in module.actions:
                if action.type == type_:
                    return action
        raise KeyError(type_)

    @property
    def hyperparameters(self):
        return self.action("hyperparameters_injection").config


def assemble(job: JobSpec | Path | str) -> Generator:
    """Parse (if given a path), resolve and check a job; raise JobError on the first problem."""
    spec = job if isinstance(job, JobSpec) else read_job(job)
    base = spec.base_dir
    degree = convert(spec.degree.text, int, spec.degree.where, "parallelism-degree", base, {"min": 1})
    seed = 0 if spec.seed is None else convert(spec.seed.text, int, spec.seed.where, "seed", base, {"min": 0})
    output = Path(spec.output.text) if spec.output else base / "runs" / spec.file.stem
    for name, where in spec.modules.items():
        if name.lower() not in MODULE_BY_NAME:
            raise JobError(where, f"unknown module '{name}'", did_you_mean(name, [m.name for m in MODULES]))

    actions = {a.type: a for a in _explicit_actions(spec)}
    actions.update(_injection_actions(spec, actions))
    for point in POINTS:
        if point.type not in actions and point.default is not None:
            actions[point.type] = Action(point, point.registry.get(point.default, spec.where), None, None, False,
                                         base_dir=base)
            actions[point.type].config = bind(actions[point.type].entry.config, [], base, point.title)
    cluster = bind(ClusterConfig, spec.cluster, base, "<cluster>")
    _fit_dependencies(actions, cluster, spec)

    modules = {m.name: Module(m.name, m.title, [actions[p.type] for p in POINTS if p.module == m.name])
               for m in MODULES}
    root = Composite("cnn_parallelism_generator", "CNN-Parallelism-Generator", [
        Composite(c, title, [modules[m.name] for m in MODULES if m.composite == c]) for c, title in COMPOSITES.items()
    ])
    return Generator(spec, root, _bindings(), degree, seed, output,
                     bind(MonitoringConfig, spec.monitoring, base, "<monitoring>"), cluster)


def _explicit_actions(spec: JobSpec):
    seen: dict[str, Location] = {}
    for a in spec.actions:
        point = POINT_BY_NAME.get(a.type.lower())
        if point is None:
            raise JobError(a.where, f"unknown action type '{a.type}'",
                           did_you_mean(a.type, [p.type for p in POINTS if p.type not in SET_ELSEWHERE]))
        if point.type in SET_ELSEWHERE:
            raise JobError(a.where, f"{point.title} is not set by an <action>", f"use {SET_ELSEWHERE[point.type]}")
        module = MODULE_BY_NAME[a.module.lower()]
        if module.name != point.module:
            raise JobError(a.where, f"action '{a.type}' does not belong to module '{a.module}'",
                           f"move it into <module name=\"{point.module}\">")
        if point.type in seen:
            raise JobError(a.where, f"action '{point.type}' is given twice (first at line {seen[point.type].line})",
                           "keep one of them")
        seen[point.type] = a.where
        if not point.extensible and a.choice and a.choice.path:
            raise JobError(a.where, f"'{point.type}' is a non-extensible action: it can be parametrised "
                           "but not overridden with your own code", "remove the <path> and pick one of: "
                           + ", ".join(point.registry.names()))
        if a.extensible != point.extensible:
            right = "extensible" if point.extensible else "non_extensible"
            raise JobError(a.where, f"'{point.type}' is {'an ' if point.extensible else 'a non-'}extensible action",
                           f'write class="{right}"')
        if a.plugins and not point.extensible:
            where = next(iter(a.plugins.values())).where
            raise JobError(where, f"'{point.type}' is non-extensible: user code cannot be plugged into it",
                           "remove the <path>; plug-ins go into extensible actions such as checkpoint")
        entry = _choose(point.registry, a.choice, point.default, a.where)
        # user code (a file, an entry point without Config) is checked against its signature when built
        checked = entry.config is not None or entry.origin == "built-in"
        config = bind(entry.config, a.params, spec.base_dir, f"{point.type} '{entry.name}'") if checked else None
        plugins = {name: point.registry.from_file(c.path, c.entry or name, c.where) for name, c in a.plugins.items()}
        yield Action(point, entry, config, a.where, True, a.params, plugins, spec.base_dir)


def _choose(registry, choice: Choice | None, default: str | None, where: Location) -> Entry:
    if choice is None:
        if default is None:
            raise JobError(where, f"no {registry.point} is chosen", "add an unnamed <value> naming one")
        return registry.get(default, where)
    if choice.path is not None:
        return registry.from_file(choice.path, choice.entry, choice.where)
    return registry.get(choice.name, choice.where)


def _injection_actions(spec: JobSpec, explicit: dict[str, Action]) -> dict[str, Action]:
    """Task, architecture, dataset and hyperparameters come from their own job sections."""
    base = spec.base_dir
    points = {p.type: p for p in POINTS}

    def make(point_type, entry, settings, where):
        point = points[point_type]
        config = bind(entry.config, settings, base, f"{point.title} '{entry.name}'", where) if entry.config else None
        return Action(point, entry, config, where, True, settings, {}, base)

    task = TASKS.get(spec.task, spec.where)
    arch = spec.architecture
    if arch.path is not None and arch.path.suffix == ".py":
        arch_entry = ARCHITECTURES.from_file(arch.path, arch.entry, arch.where)
        arch_settings = spec.architecture_params
    elif arch.path is not None and arch.path.suffix == ".keras":  # a Keras 3 model file: the `keras` entry
        if arch.entry:
            raise JobError(arch.where, f"entry=\"{arch.entry}\" names a Python symbol, but {arch.path.name} is a "
                           "Keras model file", "remove entry= (it applies to .py architecture files)")
        if not arch.path.is_file():
            raise JobError(arch.where, f"the Keras model file {arch.path} does not exist",
                           "fix the <path> (relative paths are read from the job file's folder)")
        arch_entry = ARCHITECTURES.get("keras", arch.where)
        arch_settings = [Setting("path", str(arch.path), arch.where), *spec.architecture_params]
    elif arch.path is not None:
        raise JobError(arch.where, f"architecture file {arch.path.name} is not a Python file or a Keras model",
                       "describe the network in a .py file defining build(in_channels, num_classes, ...) "
                       "or an nn.Module class (entry=\"ClassName\"), or save a Keras 3 model as a .keras file")
    else:
        arch_entry, arch_settings = ARCHITECTURES.get(arch.name, arch.where), spec.architecture_params
    data_format = spec.data_format
    data_entry = DATASETS.get(data_format.name or "decathlon", data_format.where)
    data_settings = [*spec.data_paths.values(), *spec.data_params]
    return {
        "task_definition": make("task_definition", task, [], spec.where),
        "architecture_injection": make("architecture_injection", arch_entry, arch_settings, arch.where),
        "dataset_injection": make("dataset_injection", data_entry, data_settings, data_format.where),
        "hyperparameters_injection": make("hyperparameters_injection",
                                          points["hyperparameters_injection"].registry.get("xml", spec.where),
                                          spec.hyperparameters, spec.where),
    }


def _fit_dependencies(actions: dict[str, Action], cluster: ClusterConfig, spec: JobSpec) -> None:
    """Intra-module dependencies: a swapped implementation may need another action or launcher."""
    points = {p.type: p for p in POINTS}
    for action in list(actions.values()):
        for other_type, allowed in action.entry.requires.items():
            other = actions.get(other_type)
            if other is None or not other.explicit:
                point = points[other_type]
                entry = point.registry.get(allowed[0], spec.where)
                actions[other_type] = Action(point, entry, bind(entry.config, [], spec.base_dir, point.title),
                                             None, False, base_dir=spec.base_dir)
            elif other.entry.name not in allowed:
                raise JobError(other.where, f"{action.type} '{action.entry.name}' needs {other_type} "
                               f"{' or '.join(repr(a) for a in allowed)}, but the job sets '{other.entry.name}'",
                               f"change this action to {allowed[0]} or remove it to let the engine choose")
        launchers = action.entry.launchers
        if "mpirun" in launchers:  # srun starts the same MPI ranks (over PMIx) as mpirun does
            launchers = (*launchers, "srun")
        if launchers and cluster.launcher != "auto" and cluster.launcher not in launchers:
            raise JobError(action.where or spec.where, f"{action.type} '{action.entry.name}' cannot be started by "
                           f"the '{cluster.launcher}' launcher", "set <property name=\"launcher\"> to "
                           + " or ".join(launchers))
    missing = [p.type for p in POINTS if p.type not in actions]
    if missing:
        raise JobError(spec.where, f"no implementation for {', '.join(missing)}", "add the missing actions")


def _bindings() -> list[Binding]:
    providers = {c: p.type for p in POINTS for c in p.provides}
    return [Binding(providers[c], p.type, c) for p in POINTS for c in p.consumes]
