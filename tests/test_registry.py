"""The registries: every built-in is found without importing it, its Config read torch-free is the one
the module declares, every entry builds from its Config defaults, and no default is written twice."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest
import torch

from autocnnp.core.errors import Location
from autocnnp.core.world import World
from autocnnp.engine.values import bind
from autocnnp.generator.points import POINTS, TRACKERS, registry
from autocnnp.generator.protocols import StrategyConfig, summary
from autocnnp.run.config import CLUSTER_CONFIGS
from autocnnp.training.monitor import MonitoringConfig

PACKAGE = Path(__file__).resolve().parents[1] / "autocnnp"
WHERE = Location(Path("job.xml"), 1, 1)
# the torch built-ins; tests/test_tensorflow.py checks the tensorflow ones in a process of their own
BUILTINS = [(p.type, name) for p in POINTS for name in p.registry.names("torch")]
# Built with world size 1 in a subprocess of their own: they initialise MPI or a process group.
IN_SUBPROCESS = {"communication_init", "dist_strategy"}


def entry_of(point: str, name: str):
    return registry(point).get(name, WHERE)


def fields(cls) -> list[tuple]:
    hints = typing.get_type_hints(cls)
    return [(f.name, f.default, hints[f.name], dict(f.metadata)) for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("point,name", BUILTINS)
def test_the_torch_free_reading_equals_the_module(point, name):
    entry = entry_of(point, name)
    impl = entry.load()
    real = getattr(sys.modules[impl.__module__], "Config", None)
    assert (entry.config is None) == (real is None)
    if real is not None:
        assert entry.config is not real  # read from the text, not imported ...
        assert fields(entry.config) == fields(real)  # ... yet the same fields, defaults, types, bounds and help
        assert all(f.metadata.get("help") for f in dataclasses.fields(real)), f"{name}: a field has no help text"
    if isinstance(impl, type):
        assert entry.requires == dict(getattr(impl, "requires", {}))
        assert entry.launchers == tuple(getattr(impl, "launchers", ()))
    assert entry.summary and entry.summary == summary(impl)


@pytest.mark.parametrize("name", TRACKERS.names())
def test_a_tracker_is_read_as_its_module_declares_it(name):
    entry = TRACKERS.get(name, WHERE)
    impl = entry.load()
    real = sys.modules[impl.__module__].Config
    assert entry.config is not real and fields(entry.config) == fields(real)
    assert entry.summary == summary(impl)


def test_every_point_has_its_default_and_names_are_unique():
    for point in POINTS:
        names = point.registry.names()
        assert names and len(names) == len(set(names))
        assert point.default is None or point.default in names


def _runtime(point: str, tmp_path: Path) -> dict:
    if point == "device_placement":
        return {"world": World()}
    if point == "memory_allocation":
        return {"device": torch.device("cpu")}
    if point == "lr_policy":
        return {"base_lr": 0.1, "replicas": 2, "steps_per_epoch": 3, "total_epochs": 20}
    if point == "checkpoint":
        return {"directory": tmp_path / "ck", "rank": 0}
    if point == "architecture_injection":
        return {"in_channels": 2, "num_classes": 3}
    return {}


REQUIRED = {("architecture_injection", "keras"): "a saved Keras model: tests/test_keras_architecture.py builds it",
            ("dataset_injection", "decathlon"): "data on disk: built below"}


@pytest.mark.parametrize("point,name", [b for b in BUILTINS if b[0] not in IN_SUBPROCESS and b not in REQUIRED])
def test_every_entry_builds_from_its_config_defaults(point, name, tmp_path):
    entry = entry_of(point, name)
    config = bind(entry.config, [], Path("."), name)
    built = entry.load()(*([config] if config is not None else []), **_runtime(point, tmp_path))
    if point == "architecture_injection":
        sides = (16, 16, 16) if config.input_sizes().dimensions == 3 else (32, 32)  # a 3D patch or a 2D slice
        assert built.eval()(torch.randn(1, 2, *sides)).shape == (1, 3, *sides)
    elif point == "lr_policy":
        assert built.lr(0, 0) > 0 and built.describe()
    elif point == "dataset_injection":
        data = built.datasets(world=World(), seed=0, cache_dir=tmp_path)
        image, label = data.train[0]
        assert image.shape[0] == data.in_channels and label.max() < data.num_classes
    else:
        assert built is not None


def test_the_decathlon_format_builds_from_its_defaults_and_a_dataset(tmp_path):
    from autocnnp.data.synth import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "ds", "atrium", cases=3, shape=(16, 16, 8), seed=0)
    entry = entry_of("dataset_injection", "decathlon")
    fmt = entry.load()(entry.config(train=root))
    data = fmt.datasets(world=World(), seed=0, cache_dir=tmp_path / "cache")
    assert (data.in_channels, data.num_classes) == (1, 2) and len(data.train) and len(data.valid)
    assert fmt.check().problems == [] and fmt.check().notes == [] and fmt.files() == [root]


BUILD_WITH_ONE_RANK = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from autocnnp.engine.values import bind
    from autocnnp.generator.points import registry
    built = []
    for point in ("communication_init", "dist_strategy"):
        for name in registry(point).names("torch"):
            entry = registry(point).get(name, None)
            if name == "horovod" and not HOROVOD:
                continue
            config = bind(entry.config, [], Path("."), name)
            if point == "communication_init":
                world = entry.load()(*([config] if config is not None else []), timeout_s=60)
                assert world.world_size == 1, name
            else:
                comm = registry("communication_init").get(entry.requires["communication_init"][0], None)
                comm_config = bind(comm.config, [], Path("."), comm.name)
                world = comm.load()(*([comm_config] if comm_config is not None else []), timeout_s=60)
                strategy = entry.load()(config, world=world, device=torch.device("cpu"))
                model = strategy.wrap(torch.nn.Conv2d(1, 2, 3, padding=1))
                optimizer = strategy.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
                assert len(strategy.sampler(list(range(4)), shuffle=False, seed=0)) == 4
                model(torch.randn(2, 1, 4, 4)).sum().backward()
                strategy.after_backward(model)
                strategy.step(optimizer, torch.amp.GradScaler("cpu", enabled=False))
                strategy.end_epoch(model)
                assert strategy.unwrap(model) is not None
            built.append(name)
    print(" ".join(built))
""")


@pytest.mark.slow
def test_communication_inits_and_strategies_build_from_their_defaults_with_one_rank(tmp_path):
    import importlib.util

    horovod = importlib.util.find_spec("horovod") is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "RANK", "WORLD_SIZE"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    result = subprocess.run([sys.executable, "-c", f"HOROVOD = {horovod}\n" + BUILD_WITH_ONE_RANK], cwd=tmp_path,
                            capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = set(registry("communication_init").names("torch")) | set(registry("dist_strategy").names("torch"))
    assert set(result.stdout.split()) == (expected if horovod else expected - {"horovod"})


def test_replicas_are_known_before_anything_is_built():
    strategies = registry("dist_strategy")
    assert strategies.get("ring_allreduce", WHERE).config().replicas(4) == 4
    assert strategies.get("fedavg", WHERE).config().replicas(4) == 1
    server = strategies.get("parameter_server", WHERE).config
    assert server(server="dedicated").replicas(4) == 3 and server().replicas(4) == 4
    assert all(issubclass(e.config, StrategyConfig) for n in strategies.names() for e in strategies.builtins(n))


# --- each default declared once ---------------------------------------------------------------------

def _configs() -> list[type]:
    builtins = [e.config for p in POINTS for n in p.registry.names() for e in p.registry.builtins(n)]
    return [c for c in builtins if c is not None] + [MonitoringConfig, *CLUSTER_CONFIGS]


def _declared_defaults() -> dict[str, list[tuple[object, str]]]:
    """field name (and aliases) -> [(default, declaring Config)] over every Config, fields counted where they
    are declared (a subclass inherits, it does not declare again)."""
    out: dict[str, list] = {}
    seen = set()
    for config in _configs():
        for cls in config.__mro__:
            if not dataclasses.is_dataclass(cls) or (cls.__module__, cls.__qualname__) in seen:
                continue
            seen.add((cls.__module__, cls.__qualname__))
            own = cls.__dict__.get("__annotations__", {})
            for f in dataclasses.fields(cls):
                if f.name in own and f.default is not dataclasses.MISSING and f.default is not None:
                    for key in (f.name, *f.metadata.get("aliases", ())):
                        out.setdefault(key, []).append((f.default, f"{cls.__module__}.{cls.__qualname__}"))
    return out


def test_no_two_configs_declare_the_same_setting_with_the_same_default():
    twice = {name: owners for name, owners in _declared_defaults().items()
             if len({repr(d) for d, _ in owners}) < len(owners) and not isinstance(owners[0][0], bool)}
    assert not twice, f"declare these once, in a shared base Config: {twice}"


def _literal(node):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        return NotImplemented


def _defaults_outside_configs(tree: ast.AST):
    """(name, default, line) of every keyword default in signatures, every attribute of a class that is not
    a Config, every fallback of ``getattr(x, "name", default)`` and ``x.get("name", default)``, and every
    argparse ``default=`` (named by its flag)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            for arg, default in zip(positional[len(positional) - len(args.defaults):], args.defaults):
                yield arg.arg, _literal(default), default.lineno
            for arg, default in zip(args.kwonlyargs, args.kw_defaults):
                if default is not None:
                    yield arg.arg, _literal(default), default.lineno
        elif isinstance(node, ast.ClassDef) and not node.name.endswith("Config"):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value is not None:
                    yield item.target.id, _literal(item.value), item.lineno
                elif isinstance(item, ast.Assign):
                    for target in item.targets:
                        if isinstance(target, ast.Name):
                            yield target.id, _literal(item.value), item.lineno
        elif isinstance(node, ast.Call) and (getattr(node.func, "id", "") == "getattr" and len(node.args) == 3
                                             or getattr(node.func, "attr", "") == "get" and len(node.args) == 2):
            key, default = node.args[-2:]  # getattr(config, "name", default), mapping.get("name", default)
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                yield key.value, _literal(default), default.lineno
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags = [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
            for k in node.keywords:
                if k.arg == "default" and flags:
                    yield flags[0].lstrip("-").replace("-", "_"), _literal(k.value), k.value.lineno


# Same name, another setting: the kind of NIfTI dataset `autocnnp synth` writes is not <data format="synthetic">'s.
NOT_THE_SAME_SETTING = {("data/synth.py", "kind")}


def test_no_default_is_written_again_outside_its_config():
    """A Config's default is the only place it is written: no implementation signature, other dataclass or
    command-line option repeats it (a job's default and the code's would drift apart)."""
    declared = _declared_defaults()
    again = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for name, value, line in _defaults_outside_configs(ast.parse(path.read_bytes())):
            owners = [] if (path.relative_to(PACKAGE).as_posix(), name) in NOT_THE_SAME_SETTING else declared.get(name, [])
            if value is not NotImplemented and value is not None and \
                    any(type(value) is type(d) and value == d for d, _ in owners):
                again.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name}={value!r} (declared in "
                             f"{', '.join(o for _, o in owners)})")
    assert not again, "defaults written twice:\n" + "\n".join(again)


def test_implementations_take_their_config_not_its_fields():
    for point, name in BUILTINS:
        entry = entry_of(point, name)
        impl = entry.load()
        if entry.config is None:
            continue
        params = inspect.signature(impl.__init__ if isinstance(impl, type) else impl).parameters
        overlap = set(params) & {f.name for f in dataclasses.fields(entry.config)}
        assert not overlap, f"{name} takes {overlap} as parameters: read them from its Config"
