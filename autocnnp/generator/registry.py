"""One small registry per extension point (detectron2 style), filled lazily so that the engine
never imports torch: an entry names its implementation as ``"module:attr"``, imported on build.

Implementations come from three places, and the plan says which one was used:
built-in (``autocnnp.components``), a third-party distribution's entry point in the group
``autocnnp.<point>``, or a Python file named in the job.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.errors import JobError, Location, did_you_mean


@dataclass(frozen=True)
class Entry:
    """A registered implementation of one extension point."""

    name: str
    target: str
    config: type | None = None
    summary: str = ""
    origin: str = "built-in"
    requires: dict[str, tuple[str, ...]] = field(default_factory=dict)
    launchers: tuple[str, ...] = ()

    def load(self):
        """Import and return the implementation object."""
        if self.origin.startswith("file "):
            return load_file_symbol(Path(self.target.rsplit(":", 1)[0]), self.target.rsplit(":", 1)[1])
        module, _, attr = self.target.partition(":")
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj


class Registry:
    """Name -> Entry for one extension point."""

    def __init__(self, point: str, file_entry: str):
        self.point = point
        self.file_entry = file_entry
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, target: str, config: type | None = None, summary: str = "", **kw) -> Entry:
        if name in self._entries:
            raise ValueError(f"{self.point} '{name}' is registered twice")
        entry = self._entries[name] = Entry(name, target, config, summary, **kw)
        return entry

    def names(self) -> list[str]:
        _load_builtins()
        return sorted(self._entries)

    def get(self, name: str, where: Location) -> Entry:
        """The entry called ``name``: built-in first, then installed entry points."""
        _load_builtins()
        if name in self._entries:
            return self._entries[name]
        from importlib.metadata import entry_points  # ~15 ms: only when a name is not built in

        found = entry_points(group=f"autocnnp.{self.point}", name=name)
        if found:
            ep = next(iter(found))
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plug-in must not look like a missing one
                raise JobError(where, f"{self.point} '{name}' from entry point {ep.value} fails to import: "
                               f"{type(exc).__name__}: {exc}", "fix or reinstall that distribution") from None
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else ep.value
            return Entry(name, ep.value, getattr(obj, "Config", None), _summary(obj), f"entry point of {dist}",
                         dict(getattr(obj, "requires", {})), tuple(getattr(obj, "launchers", ())))
        installed = [ep.name for ep in entry_points(group=f"autocnnp.{self.point}")]
        raise JobError(where, f"unknown {self.point} '{name}'", did_you_mean(name, self.names() + installed))

    def from_file(self, path: Path, entry: str | None, where: Location) -> Entry:
        """An entry for ``entry`` (default: this point's conventional name) defined in a user file.

        The file is checked (exists, parses, defines the symbol) but not executed, so validation
        stays fast and side-effect free; it is imported when the generator is built.
        """
        symbol = entry or self.file_entry
        if not path.is_file():
            raise JobError(where, f"the {self.point} file {path} does not exist",
                           "fix the <path> (relative paths are read from the job file's folder)")
        if path.suffix != ".py":
            raise JobError(where, f"{path} is not a Python file", f"point at a .py file defining {symbol}")
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except SyntaxError as exc:
            raise JobError(Location(path, exc.lineno or 0, exc.offset or 0), f"syntax error in {self.point} "
                           f"file: {exc.msg}", "fix the Python file named by the job") from None
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        if symbol not in defined:
            hint = did_you_mean(symbol, defined) if defined else "the file defines nothing at top level"
            raise JobError(where, f"{path} defines no '{symbol}' for {self.point}",
                           f"{hint}; or name the symbol with entry=\"...\" on the element")
        return Entry(symbol, f"{path}:{symbol}", None, ast.get_docstring(tree) or "", f"file {path}")


def _summary(obj) -> str:
    return (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""


def load_file_symbol(path: Path, symbol: str):
    """Import a user file as a module (once per process) and return one of its symbols."""
    name = f"autocnnp_user_{abs(hash(str(path)))}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return getattr(module, symbol)


_BUILTINS_LOADED = False


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        importlib.import_module("autocnnp.components")


# One registry per extension point; the second argument is the symbol a user file must define.
COMMUNICATION = Registry("communication_init", "init")
PLACEMENT = Registry("device_placement", "place")
MEMORY = Registry("memory_allocation", "apply")
STRATEGIES = Registry("dist_strategy", "Strategy")
CHECKPOINTS = Registry("checkpoint", "Checkpointer")
LR_POLICIES = Registry("lr_policy", "Policy")
HYPERPARAMETERS = Registry("hyperparameters_injection", "inject")
TASKS = Registry("task_definition", "Task")
ARCHITECTURES = Registry("architecture", "build")
DATASETS = Registry("dataset", "build")
