"""The CNN-Parallelism-Generator as the thesis draws it (Figure 4.3): composites hold modules,
modules hold actions, bindings carry data between actions."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import JobError, Location
from ..core.files import jsonable
from ..engine.job import Setting
from ..engine.values import bind, convert
from .points import Point
from .protocols import adopt
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
    framework: str = "torch"  # the job's: which protocol a user class is seen through

    @property
    def type(self) -> str:
        return self.point.type

    @property
    def title(self) -> str:
        return f"{self.type} '{self.entry.name}'"

    def recorded(self) -> dict[str, Any]:
        """The parameters as a record keeps them (the manifest, a model card): the Config's fields as plain
        values, else the settings' texts."""
        return jsonable(self.config) if self.config is not None else {s.name: s.text for s in self.settings}

    def params(self, impl) -> dict[str, Any]:
        """Keyword parameters of a user callable without a Config, typed by its signature."""
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

    def build(self, **runtime):
        """Call the implementation: with its bound Config first (when it declares one) or its keyword
        parameters, then the runtime objects, and the user plug-ins of an extensible action."""
        impl = adopt(self.entry.load(), self.point.protocol(self.framework))
        if self.plugins:
            runtime["plugins"] = {name: e.load() for name, e in self.plugins.items()}
        config = self.config
        if config is None and (config_cls := getattr(impl, "Config", None)) is not None:  # user code: bound now
            config = bind(config_cls, self.settings, self.base_dir, self.title, self.where)
        if config is not None:
            return impl(config, **runtime)
        return impl(**runtime, **self.params(impl))


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
    children: list[Composite | Module]

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
