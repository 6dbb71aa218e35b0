"""The CNN-Parallelism-Generator as the thesis draws it (Figure 4.3): composites hold modules,
modules hold actions, bindings carry data between actions."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..engine.errors import JobError, Location
from ..engine.job import Setting
from ..engine.values import convert
from .points import Point
from .registry import Entry


@dataclass
class Action:
    """One parallelisation step: an extension point bound to an implementation and its parameters."""

    point: Point
    entry: Entry
    config: Any
    where: Location | None
    explicit: bool
    settings: list[Setting] = field(default_factory=list)
    plugins: dict[str, Entry] = field(default_factory=dict)
    base_dir: Path = Path(".")

    @property
    def type(self) -> str:
        return self.point.type

    def params(self, impl=None) -> dict[str, Any]:
        """Typed parameters: from the Config dataclass, or from the callable's signature for user code."""
        if self.config is not None:
            return {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)}
        if not self.settings:
            return {}
        sig = inspect.signature(impl)
        out = {}
        for s in self.settings:
            p = sig.parameters.get(s.name)
            if p is None:
                raise JobError(s.where, f"{self.entry.origin} '{self.entry.name}' takes no parameter '{s.name}'",
                               "accepted: " + ", ".join(sig.parameters) if sig.parameters else "remove it")
            tp = p.annotation if p.annotation is not inspect.Parameter.empty else (
                type(p.default) if p.default not in (inspect.Parameter.empty, None) else str)
            out[s.name] = convert(s.text, tp, s.where, s.name, self.base_dir)
        return out

    def build(self, *args, **runtime):
        """Call the implementation with runtime objects, the typed parameters and any user plugins."""
        impl = self.entry.load()
        kwargs = {**runtime, **self.params(impl)}
        if self.plugins:
            kwargs["plugins"] = {name: e.load() for name, e in self.plugins.items()}
        return impl(*args, **kwargs)


@dataclass
class Module:
    """A primitive component: actions cooperating towards one parallelisation milestone."""

    name: str
    title: str
    actions: list[Action]


@dataclass
class Composite:
    """A component made of modules and/or composites, replaceable as a whole."""

    name: str
    title: str
    children: list["Composite | Module"]

    def modules(self) -> Iterator[Module]:
        for child in self.children:
            if isinstance(child, Module):
                yield child
            else:
                yield from child.modules()


@dataclass(frozen=True)
class Binding:
    """A connector: ``source`` hands ``carries`` to ``target``."""

    source: str
    target: str
    carries: str
