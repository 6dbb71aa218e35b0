"""Typed values: bind written settings onto a Config dataclass (core/settings.py), with located errors.

Supported field types: ``int``, ``float``, ``bool``, ``str``, ``Path`` (relative paths resolve
against the job file's folder), ``Literal[...]`` (enumerations, case-insensitive) and ``X | None``.
Field metadata may carry ``min``, ``max`` (inclusive), ``gt`` (exclusive), ``aliases``, ``help`` and
``must_exist`` (paths). A value given on the command line (``--set``) replaces the file's, whatever
spelling either uses.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

from ..core.errors import JobError, Location, Source, did_you_mean
from .job import Setting

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def type_name(tp) -> str:
    """A short human name for a field type (for plans and errors)."""
    tp = _unwrap_optional(tp)
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    return {int: "integer", float: "number", bool: "boolean", str: "text", Path: "path"}.get(tp, str(tp))


def _path(text: str, where: Location, name: str, base_dir: Path, must_exist: bool) -> Path:
    shown = text if len(text) < 200 else text[:200] + "..."
    try:
        p = Path(text).expanduser()
        p = p if p.is_absolute() else (base_dir / p).resolve()
        if must_exist and not p.exists():
            raise JobError(where, f"{name} {p} does not exist",
                           "fix the path (relative paths are read from the job file's folder)")
    except (OSError, RuntimeError) as exc:  # a symbolic-link loop, a name too long
        raise JobError(where, f"{name} {shown} cannot be used ({getattr(exc, 'strerror', None) or exc})",
                       "fix the path") from None
    return p


def convert(text: str, tp, where: Location, name: str, base_dir: Path, meta=None):
    """Convert ``text`` to ``tp`` or raise a JobError at ``where``."""
    tp = _unwrap_optional(tp)
    meta = meta or {}
    t = text.strip()
    try:
        if typing.get_origin(tp) is typing.Literal:
            options = typing.get_args(tp)
            by_lower = {str(o).lower(): o for o in options}
            if t.lower() not in by_lower:
                raise JobError(where, f"'{t}' is not a valid {name}", did_you_mean(t, map(str, options)))
            return by_lower[t.lower()]
        if tp is bool:
            if t.lower() in _TRUE:
                return True
            if t.lower() in _FALSE:
                return False
            raise ValueError
        if tp in (int, float) and (not t.isascii() or "_" in t):  # Python would read 1_0 and full-width digits
            raise ValueError
        value: int | float
        if tp is int:
            value = int(t)
        elif tp is float:
            value = float(t)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError
        elif tp is Path:
            return _path(t, where, name, base_dir, meta.get("must_exist"))
        else:
            return t
    except ValueError:
        raise JobError(where, f"{name} must be {_article(type_name(tp))}, not '{t}'",
                       f"write {name} as {_example(tp)}") from None
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise JobError(where, f"{name} is {value}, it must be greater than {meta['gt']}",
                       f"set {name} above {meta['gt']}")
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"at least {lo}" if hi is None else (f"at most {hi}" if lo is None else f"between {lo} and {hi}")
        raise JobError(where, f"{name} is {value}, it must be {bounds}", f"set {name} {bounds}")
    return value


def _article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def _example(tp) -> str:
    return {int: "a whole number such as 8", float: "a number such as 0.01 or 1e-5",
            bool: "true or false"}.get(tp, "text")


def _field_index(config_cls) -> dict[str, str]:
    """Every name a job may use for a field of ``config_cls`` (names and aliases, any case) -> field."""
    index = {}
    for f in dataclasses.fields(config_cls):
        for name in (f.name, *f.metadata.get("aliases", ())):
            index[name] = index[name.lower()] = f.name
    return index


def bind(config_cls, settings: list[Setting], base_dir: Path, what: str, where: Location | None = None):
    """Build ``config_cls`` from settings; unknown names get 'did you mean' hints."""
    if config_cls is None:
        if settings:
            s = settings[0]
            raise JobError(s.where, f"{what} takes no parameters, but '{s.name}' is given", "remove it")
        return None
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    index = _field_index(config_cls)
    values: dict[str, object] = {}
    seen: dict[str, Location] = {}
    for s in settings:
        key = index.get(s.name, index.get(s.name.lower()))
        if key is None:
            raise JobError(s.where, f"{what} has no parameter '{s.name}'", did_you_mean(s.name, fields))
        if key in seen and not isinstance(s.where, Source):
            raise JobError(s.where, f"'{s.name}' sets {key}, already set at line {seen[key].line}", "keep one")
        seen[key] = s.where
        values[key] = convert(s.text, hints[key], s.where, key, base_dir, fields[key].metadata)
    missing = [f.name for f in fields.values()
               if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        help_text = fields[missing[0]].metadata.get("help", "")
        raise JobError(where or (settings[0].where if settings else Location(base_dir)),
                       f"{what} needs the parameter '{missing[0]}'" + (f" ({help_text})" if help_text else ""),
                       f"add it, e.g. <param name=\"{missing[0]}\">...</param>")
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as exc:
        named = [(str(exc).find(k), -len(k), k) for k in seen if k in str(exc)]
        where = seen[min(named)[2]] if named else where or (settings[0].where if settings else Location(base_dir))
        raise JobError(where, f"{what}: {exc}", "see the job file reference in the docs (reference/job-file)") from None


def bind_section(config_classes: tuple, settings: list[Setting], base_dir: Path, section: str) -> list:
    """Bind one job section (``<cluster>``, ``<monitoring>``) whose properties belong to several Configs:
    each property goes to the Config that declares it; a name no Config declares is an error."""
    owners = {name: cls for cls in config_classes for name in _field_index(cls)}
    for s in settings:
        if s.name not in owners and s.name.lower() not in owners:
            names = [f.name for cls in config_classes for f in dataclasses.fields(cls)]
            raise JobError(s.where, f"{section} has no property '{s.name}'", did_you_mean(s.name, names))
    return [bind(cls, [s for s in settings if owners.get(s.name, owners.get(s.name.lower())) is cls], base_dir,
                 section) for cls in config_classes]


def describe(config) -> dict[str, object]:
    """Field name -> value of a bound config (empty for None)."""
    return {} if config is None else dataclasses.asdict(config)
