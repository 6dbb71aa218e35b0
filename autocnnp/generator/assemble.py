"""Assemble the CNN-Parallelism-Generator from a job: resolve every action to an implementation,
bind its typed parameters, check the modules still fit together. Nothing heavy is imported."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import JobError, Location, did_you_mean
from ..core.rundir import ZOO_CHECKPOINT, RunDir, checkpoint_file
from ..engine.job import ActionSpec, Choice, JobSpec, Setting, read_job
from ..engine.values import bind, convert
from .points import COMPOSITES, MODULE_BY_NAME, MODULES, PLUGIN_FITS, POINT_BY_NAME, POINTS, SET_ELSEWHERE
from .protocols import DataFormat, LRPolicy, StrategyConfig, input_sizes_of, replicas_of, shards_of, steps_per_epoch
from .registry import Entry
from .tree import Action, Binding, Composite, Module

MAX_RANKS = 1_000_000  # far above any machine; a typo such as 1000000000 is refused, not planned


@dataclass(frozen=True)
class Pretrained:
    """Where the network's starting weights come from: a zoo model (``zoo:NAME[/VERSION]``, latest version
    when none) or a checkpoint file or run folder; ``freeze`` none or encoder."""

    zoo: tuple[str, int | None] | None
    path: Path | None
    freeze: str
    where: Location

    @property
    def source(self) -> str:
        if self.zoo is None:
            return str(self.path)
        return f"zoo:{self.zoo[0]}" + (f"/{self.zoo[1]}" if self.zoo[1] is not None else "")

    def local(self, rundir: RunDir) -> Path:
        """The checkpoint the ranks load: the file, a run folder's best (else latest) checkpoint, or where
        run & manage puts a zoo model before the ranks start."""
        if self.zoo is not None:
            return rundir.pretrained(*self.zoo) / ZOO_CHECKPOINT
        assert self.path is not None  # a Pretrained names a zoo model or a path (_pretrained)
        return checkpoint_file(self.path)


ZOO_SOURCE = re.compile(r"^zoo:([\w.-]+)(?:/(\d+))?$")


def _pretrained(spec: JobSpec) -> Pretrained | None:
    if spec.freeze is None:
        freeze = "none"
    else:
        freeze = spec.freeze.text.strip().lower()
        if freeze not in ("none", "encoder"):
            raise JobError(spec.freeze.where, f"freeze '{spec.freeze.text}' is neither none nor encoder",
                           "write freeze=\"encoder\" (train the decoder and head only) or freeze=\"none\"")
        if spec.pretrained is None and freeze != "none":
            raise JobError(spec.freeze.where, "freeze needs pretrained weights", 'add pretrained="zoo:NAME" or a checkpoint')
    if spec.pretrained is None:
        return None
    text, where = spec.pretrained.text.strip(), spec.pretrained.where
    if text.startswith("zoo:"):
        m = ZOO_SOURCE.match(text)
        if m is None:
            raise JobError(where, f"'{text}' is not a zoo model", "write zoo:NAME or zoo:NAME/VERSION (autocnnp zoo list)")
        return Pretrained((m.group(1), int(m.group(2)) if m.group(2) else None), None, freeze, where)
    path = convert(text, Path, where, "pretrained", spec.base_dir, {"must_exist": True})
    return Pretrained(None, path, freeze, where)


@dataclass
class Generator:
    """The assembled generator: the component tree, the number of ranks, the seed and the run folder."""

    spec: JobSpec
    root: Composite
    bindings: list[Binding]
    world_size: int
    seed: int
    rundir: RunDir
    pretrained: Pretrained | None = None  # <CNN_archi pretrained=... freeze=...>
    virtual_ranks: int = 1  # ranks each process emulates (<parallelism-degree virtual="k">)
    dimension: str = field(init=False)  # 2d, or 3d when the job trains a network on 3D patches (set by assemble)

    @property
    def ranks(self) -> int:
        """The parallelism degree: processes (``world_size``) times the virtual ranks each emulates."""
        return self.world_size * self.virtual_ranks

    @property
    def framework(self) -> str:
        """What the ranks train with: torch or tensorflow (the framework action)."""
        return self.action("framework").entry.name

    def actions(self):
        for module in self.root.modules():
            yield from module.actions

    def action(self, type_: str) -> Action:
        for action in self.actions():
            if action.type == type_:
                return action
        raise KeyError(type_)

    @property
    def hyperparameters(self):
        return self.action("hyperparameters_injection").config

    def data_format(self) -> DataFormat:
        """The job's data format (cheap: it reads nothing until asked)."""
        return self.action("dataset_injection").build()

    def replicas(self, world_size: int | None = None) -> int:
        """Model replicas whose gradients make one step with ``world_size`` ranks (default: the job's
        parallelism degree, virtual ranks included)."""
        return replicas_of(self.action("dist_strategy").config, world_size or self.ranks)

    def steps_per_epoch(self, samples: int, world_size: int | None = None) -> int:
        """Each rank's optimizer steps per epoch over ``samples`` training samples with ``world_size`` ranks
        (default: the job's, virtual ranks included), the training set split as the strategy splits it."""
        shards = shards_of(self.action("dist_strategy").config, world_size or self.ranks)
        return steps_per_epoch(samples, shards, self.hyperparameters.minibatch_size)

    def lr_policy(self, steps_per_epoch: int, world_size: int | None = None, name: str | None = None) -> LRPolicy:
        """The learning-rate policy as training builds it: the job's, or the registered policy ``name``
        with its defaults, for ``world_size`` ranks (default: the job's)."""
        action = self.action("lr_policy")
        if name is not None and name != action.entry.name:
            action = default_action(POINT_BY_NAME["lr_policy"], name, self.spec, self.framework)
        hp = self.hyperparameters
        return action.build(base_lr=hp.lr, replicas=self.replicas(world_size), steps_per_epoch=steps_per_epoch,
                            total_epochs=hp.end_epoch)


def default_action(point, name: str, spec: JobSpec, framework: str, given: ActionSpec | None = None) -> Action:
    """An action of ``point`` implemented by ``name`` for ``framework``, with its default parameters, or with
    those of ``given`` (the job's action that sets parameters without naming an implementation)."""
    entry = point.registry.get(name, spec.where, framework)
    settings, where = (given.params, given.where) if given is not None else ([], None)
    config = bind(entry.config, settings, spec.base_dir, f"{point.type} '{entry.name}'" if given else point.title, where)
    return Action(point, entry, config, where, False, settings, base_dir=spec.base_dir, framework=framework)


def _unnamed(spec: JobSpec, point) -> ActionSpec | None:
    """The job's action of ``point`` that gives parameters but no implementation: the engine chooses one."""
    return next((a for a in spec.actions if a.choice is None and not a.plugins and point.default is not None
                 and POINT_BY_NAME.get(a.type.lower()) is point), None)


def assemble(spec: JobSpec | Path | str) -> Generator:
    """Parse (if given a path), resolve and check a job; raise JobError on the first problem."""
    spec = spec if isinstance(spec, JobSpec) else read_job(spec)
    base = spec.base_dir
    world_size = convert(spec.degree.text, int, spec.degree.where, "parallelism-degree", base,
                         {"min": 1, "max": MAX_RANKS})
    seed = 0 if spec.seed is None else convert(spec.seed.text, int, spec.seed.where, "seed", base, {"min": 0})
    rundir = RunDir(Path(spec.output.text) if spec.output else base / "runs" / spec.file.stem)
    for name, where in spec.modules.items():
        if name.lower() not in MODULE_BY_NAME:
            raise JobError(where, f"unknown module '{name}'", did_you_mean(name, [m.name for m in MODULES]))

    framework = _framework(spec)
    actions = {a.type: a for a in _explicit_actions(spec, framework)}
    actions.update(_injection_actions(spec, framework))
    for point in POINTS:  # a default this framework lacks is set by a dependency (a strategy's requires)
        if point.type not in actions and point.default is not None and point.registry.builtin(point.default, framework):
            actions[point.type] = default_action(point, point.default, spec, framework, _unnamed(spec, point))
    _fit_dependencies(actions, spec, framework)

    modules = {m.name: Module(m.name, m.title, [actions[p.type] for p in POINTS if p.module == m.name])
               for m in MODULES}
    root = Composite("cnn_parallelism_generator", "CNN-Parallelism-Generator", [
        Composite(c, title, [modules[m.name] for m in MODULES if m.composite == c]) for c, title in COMPOSITES.items()
    ])
    gen = Generator(spec, root, _bindings(), world_size, seed, rundir, _pretrained(spec),
                    _virtual_ranks(spec, framework, actions["dist_strategy"]))
    if framework != "torch" and gen.hyperparameters.precision == "fp16":
        where = next((s.where for s in spec.hyperparameters if s.name == "precision"), spec.where)
        raise JobError(where, f"precision fp16 (with a loss scaler) is trained on the torch framework only; this job "
                       f"trains with {framework}", "write bf16 (Keras' mixed_bfloat16) or fp32")
    _check_lr_policy(gen)
    input_size = getattr(gen.action("dataset_injection").config, "input_size", None)
    sides = tuple(input_size()) if callable(input_size) else ()  # once: in 3D it reads every training case's header
    gen.dimension = _dimension(gen, sides)
    _check_dimensions(gen, sides)
    _check_input_sizes(gen, sides)
    return gen


def _virtual_ranks(spec: JobSpec, framework: str, strategy: Action) -> int:
    """``<parallelism-degree virtual="k">``, refused where accumulating k micro-batches is not what k ranks
    of the strategy would do."""
    if spec.virtual is None:
        return 1
    k = convert(spec.virtual.text, int, spec.virtual.where, "virtual", spec.base_dir, {"min": 1, "max": MAX_RANKS})
    config = strategy.config
    why = (f"the {framework} framework trains no virtual ranks (torch only)" if framework != "torch" and k > 1
           else config.refuses_virtual_ranks() if k > 1 and isinstance(config, StrategyConfig) else None)
    if why:
        raise JobError(spec.virtual.where, f"virtual=\"{k}\" with dist_strategy '{strategy.entry.name}': {why}",
                       "remove virtual=, or use dist_strategy ring_allreduce or mpi")
    return k


def _framework(spec: JobSpec) -> str:
    """The framework action's choice (torch when the job has none), read before the other actions, which
    are resolved for it."""
    point = POINT_BY_NAME["framework"]
    for a in spec.actions:
        if a.type.lower() == point.type and a.choice is not None and a.choice.path is None:
            return point.registry.get(a.choice.name, a.choice.where, None).name
    return point.default


def _explicit_actions(spec: JobSpec, framework: str):
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
                           + ", ".join(point.registry.names(None if point.type == "framework" else framework)))
        if a.extensible != point.extensible:
            right = "extensible" if point.extensible else "non_extensible"
            raise JobError(a.where, f"'{point.type}' is {'an ' if point.extensible else 'a non-'}extensible action",
                           f'write class="{right}"')
        if a.plugins and not point.extensible:
            where = next(iter(a.plugins.values())).where
            raise JobError(where, f"'{point.type}' is non-extensible: user code cannot be plugged into it",
                           "remove the <path>; plug-ins go into extensible actions such as checkpoint")
        if _unnamed(spec, point) is a:  # its parameters go to the implementation the engine chooses
            continue
        entry = _choose(point.registry, a.choice, point.default, a.where,
                        None if point.type == "framework" else framework)
        _check_framework(point, entry, framework, a.where)
        plugins = {name: point.registry.from_file(c.path, c.entry or name, c.where, PLUGIN_FITS)
                   for name, c in a.plugins.items()}
        yield _action(point, entry, a.params, a.where, spec, framework, plugins)


def _action(point, entry: Entry, settings: list[Setting], where, spec: JobSpec, framework: str,
            plugins=None) -> Action:
    """An action whose parameters are bound now (built-ins, entry points with a Config) or, for user
    code, when it is built (the file is not executed to validate a job)."""
    config = bind(entry.config, settings, spec.base_dir, f"{point.type} '{entry.name}'", where) \
        if entry.config is not None or entry.origin == "built-in" else None
    return Action(point, entry, config, where, True, settings, plugins or {}, spec.base_dir, framework)


def _choose(registry, choice: Choice | None, default: str | None, where: Location, framework: str | None) -> Entry:
    if choice is None:
        if default is None:
            raise JobError(where, f"no {registry.point} is chosen", "add an unnamed <value> naming one")
        return registry.get(default, where, framework)
    if choice.path is not None:
        return registry.from_file(choice.path, choice.entry, choice.where)
    return registry.get(choice.name, choice.where, framework)


def _check_framework(point, entry: Entry, framework: str, where: Location) -> None:
    """An implementation that declares its frameworks must train with the job's (user files that declare
    none are taken to be written for it)."""
    if entry.frameworks and framework not in entry.frameworks and point.type != "framework":
        raise JobError(where, f"{point.type} '{entry.name}' ({entry.origin}) is written for "
                       f"{', '.join(entry.frameworks)}, but the job trains with {framework}",
                       f"choose one of: {', '.join(point.registry.names(framework)) or 'none'}; or set the "
                       f"framework action to {entry.frameworks[0]}")


def _injection_actions(spec: JobSpec, framework: str) -> dict[str, Action]:
    """Task, architecture, dataset and hyperparameters come from their own job sections."""
    points = POINT_BY_NAME
    arch, registry = spec.architecture, points["architecture_injection"].registry
    arch_settings = spec.architecture_params
    if arch.path is not None and arch.path.suffix == ".py":
        arch_entry = registry.from_file(arch.path, arch.entry, arch.where)
    elif arch.path is not None and arch.path.suffix == ".keras":  # a Keras 3 model file: the `keras` entry
        if arch.entry:
            raise JobError(arch.where, f"entry=\"{arch.entry}\" names a Python symbol, but {arch.path.name} is a "
                           "Keras model file", "remove entry= (it applies to .py architecture files)")
        if not arch.path.is_file():
            raise JobError(arch.where, f"the Keras model file {arch.path} does not exist",
                           "fix the <path> (relative paths are read from the job file's folder)")
        _check_keras_file(arch.path, arch.where)
        arch_entry = registry.get("keras", arch.where, framework)
        arch_settings = [Setting("path", str(arch.path), arch.where), *arch_settings]
    elif arch.path is not None:
        raise JobError(arch.where, f"architecture file {arch.path.name} is not a Python file or a Keras model",
                       "describe the network in a .py file defining build(in_channels, num_classes, ...) "
                       "or an nn.Module class, or save a Keras 3 model as a .keras file")
    else:
        arch_entry = registry.get(arch.name, arch.where, framework)
    _check_framework(points["architecture_injection"], arch_entry, framework, arch.where)
    data, data_point = spec.data_format, points["dataset_injection"]
    data_entry = data_point.registry.get(data.name or data_point.default, data.where, framework)
    _check_framework(data_point, data_entry, framework, data.where)
    hyper = points["hyperparameters_injection"]
    return {
        "task_definition": _action(points["task_definition"], points["task_definition"].registry.get(
            spec.task, spec.where, framework), [], spec.where, spec, framework),
        "architecture_injection": _action(points["architecture_injection"], arch_entry, arch_settings, arch.where,
                                          spec, framework),
        "dataset_injection": _action(points["dataset_injection"], data_entry,
                                     [*spec.data_paths.values(), *spec.data_params], data.where, spec, framework),
        "hyperparameters_injection": _action(hyper, hyper.registry.get(hyper.default, spec.where, framework),
                                             spec.hyperparameters, spec.where, spec, framework),
    }


def _check_keras_file(path: Path, where: Location) -> None:
    """A .keras file is a zip archive whose config.json describes the model (read here without Keras): one that
    Keras' safe mode will not load, because a layer holds Python code (a Lambda), is refused now."""
    import zipfile  # here: with bz2, lzma and shutil it costs validate of any other job ~5 ms

    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise JobError(where, f"{path} is no Keras 3 model file ({type(exc).__name__}: {exc})",
                       "save the model with model.save('model.keras') in Keras 3") from None
    layer = _python_code_layer(config)
    if layer is not None:
        raise JobError(where, f"the Keras model {path.name} holds Python code in its layer '{layer}' (a Lambda), which "
                       "Keras' safe mode refuses to load from a file", "describe the network in a .py architecture "
                       "instead: <CNN_archi><path>net.py</path></CNN_archi> whose build(in_channels, num_classes) "
                       "returns the keras.Model (its Lambda layers included)")


def _python_code_layer(node, layer: str = "?") -> str | None:
    """The name of the first layer of a Keras config whose serialised Python code (``__lambda__``) safe mode
    refuses; None when there is none."""
    if isinstance(node, dict):
        if node.get("class_name") == "__lambda__":
            return layer
        config = node.get("config")
        if "class_name" in node and isinstance(config, dict) and isinstance(config.get("name"), str):
            layer = config["name"]
        return next((found for value in node.values() if (found := _python_code_layer(value, layer))), None)
    if isinstance(node, list):
        return next((found for value in node if (found := _python_code_layer(value, layer))), None)
    return None


def _fit_dependencies(actions: dict[str, Action], spec: JobSpec, framework: str) -> None:
    """Intra-module dependencies: a swapped implementation may need another action."""
    for action in list(actions.values()):
        for other_type, allowed in action.entry.requires.items():
            other = actions.get(other_type)
            if other is None or not other.explicit:
                point = POINT_BY_NAME[other_type]
                actions[other_type] = default_action(point, allowed[0], spec, framework, _unnamed(spec, point))
            elif other.entry.name not in allowed:
                raise JobError(other.where or spec.where, f"{action.type} '{action.entry.name}' needs {other_type} "
                               f"{' or '.join(repr(a) for a in allowed)}, but the job sets '{other.entry.name}'",
                               f"change this action to {allowed[0]} or remove it to let the engine choose")
    missing = [p.type for p in POINTS if p.type not in actions]
    if missing:
        raise JobError(spec.where, f"no {framework} implementation for {', '.join(missing)}", "add the missing "
                       f"actions, naming implementations of {framework} (autocnnp components lists them)")


def _check_lr_policy(gen: Generator) -> None:
    """Build a built-in LR policy once (cheap, torch-free) so that settings that do not fit the run (a
    decay stage longer than the training, say) are refused before anything starts."""
    action = gen.action("lr_policy")
    if action.entry.origin != "built-in":
        return
    try:
        gen.lr_policy(steps_per_epoch=1)
    except ValueError as exc:
        raise JobError(action.where or gen.spec.where, f"lr_policy '{action.entry.name}': {exc}",
                       "fix its parameters or the hyperparameters' end_epoch") from None


def _check_input_sizes(gen: Generator, sides: tuple[int, ...]) -> None:
    """The data's input ``sides`` (none: the format declares none) are ones the architecture takes (its SizeRule;
    every framework, 2D or 3D): a size the network cannot take is refused here, not by every rank after the launch."""
    arch = gen.action("architecture_injection")
    rule = input_sizes_of(arch.config, arch.entry.input_sizes)
    wrong = list(dict.fromkeys(side for side in sides if not rule.takes(side)))
    deepest = rule.deepest(sides)
    if not wrong and (not sides or math.prod(deepest) >= rule.deepest_voxels):
        return
    name = arch.entry.name if arch.entry.origin == "built-in" else f"{arch.entry.name} ({arch.entry.origin})"
    params = ", ".join(f"{s.name}={s.text.strip()}" for s in arch.settings)
    size = next((s for s in gen.spec.data_params if s.name.lower() in ("size", "patch_size")), None)
    where, inputs = size.where if size else arch.where or gen.spec.where, "x".join(map(str, sides))
    if not wrong:
        what = "patch" if len(sides) == 3 else "slice"
        larger = "x".join(map(str, (2 * rule.multiple, *sides[1:])))
        raise JobError(where, f"architecture '{name}' needs at least {rule.deepest_voxels} voxels at its deepest level"
                       f"{f' ({rule.reason})' if rule.reason else ''}, but the {what} {inputs} leaves "
                       f"{'x'.join(map(str, deepest))} there", f"give a larger {what} ({larger}, say) or a smaller depth")
    nearest = "; ".join(f"{' or '.join(map(str, rule.nearest(side)))} instead of {side}" for side in wrong)
    raise JobError(where, f"architecture '{name}'{f' ({params})' if params else ''} takes input sides that are "
                   f"{rule.describe()}, but the data's inputs are {inputs}",
                   f"give the data sides it takes, the nearest being {nearest}; or change the architecture's "
                   "parameters")


def _dimension(gen: Generator, sides: tuple[int, ...]) -> str:
    """``3d`` when the job trains a network on 3D patches (its architecture's size rule says so, else its data's
    inputs have three ``sides``), else ``2d``."""
    arch = gen.action("architecture_injection")
    declared = input_sizes_of(arch.config, arch.entry.input_sizes).dimensions
    return f"{declared}d" if declared else "3d" if len(sides) == 3 else "2d"


def _check_dimensions(gen: Generator, sides: tuple[int, ...]) -> None:
    """2D slices go to a 2D network and 3D patches to a 3D one (the architecture's SizeRule says which it takes; the
    data's input ``sides``), and 3D trains on torch only: refused here, before anything starts."""
    arch = gen.action("architecture_injection")
    rule = input_sizes_of(arch.config, arch.entry.input_sizes)
    dimension = next((s for s in gen.spec.data_params if s.name.lower() == "dimension"), None)
    if gen.framework != "torch" and (len(sides) == 3 or rule.dimensions == 3):
        what = (f"dimension={dimension.text.strip()}" if dimension is not None and len(sides) == 3
                else f"architecture '{arch.entry.name}' (3D)")
        raise JobError(dimension.where if dimension is not None and len(sides) == 3 else arch.where or gen.spec.where,
                       f"{what} trains on the torch framework only; this job trains with {gen.framework}",
                       "remove the framework action (torch), or train 2D slices (dimension 2d, a 2D architecture)")
    if rule.dimensions and sides and len(sides) != rule.dimensions:
        raise JobError(arch.where or gen.spec.where,
                       f"architecture '{arch.entry.name}' takes {rule.dimensions}D inputs, but the data's inputs are "
                       f"{len(sides)}D ({'x'.join(map(str, sides))})",
                       "for 3D patches choose unet3d or resunet3d, for 2D slices unet or fcn; or change the data's "
                       "dimension")


def _bindings() -> list[Binding]:
    providers = {c: p.type for p in POINTS for c in p.provides}
    return [Binding(providers[c], p.type, c) for p in POINTS for c in p.consumes]
