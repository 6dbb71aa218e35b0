"""The job file as plain data: what the user wrote, where, with nothing resolved yet."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import JobError, Location
from .xmlparse import read_xml


@dataclass(frozen=True)
class Setting:
    """One named value as written (``<property>``, ``<param>`` or ``<value name=...>``)."""

    name: str
    text: str
    where: Location


@dataclass(frozen=True)
class Choice:
    """An implementation picked by registered name, or by a Python file and its entry symbol."""

    name: str | None
    path: Path | None
    entry: str | None
    where: Location

    @property
    def label(self) -> str:
        return str(self.path) if self.path else str(self.name)


@dataclass
class ActionSpec:
    """``<action>`` as written inside a ``<module>``."""

    module: str
    type: str
    extensible: bool
    where: Location
    choice: Choice | None = None
    params: list[Setting] = field(default_factory=list)
    plugins: dict[str, Choice] = field(default_factory=dict)


@dataclass
class JobSpec:
    """The whole ``<task>`` as written."""

    file: Path
    task: str
    where: Location
    degree: Setting
    architecture: Choice
    architecture_params: list[Setting]
    data_format: Choice
    data_paths: dict[str, Setting]
    data_params: list[Setting]
    actions: list[ActionSpec]
    modules: dict[str, Location]
    hyperparameters: list[Setting]
    monitoring: list[Setting]
    cluster: list[Setting]
    federation: list[Setting] = field(default_factory=list)  # <federation>: autocnnp/federation/
    text: str = ""  # the file as written, decoded as it declares
    pretrained: Setting | None = None  # <CNN_archi pretrained="zoo:NAME/VERSION"> or a checkpoint file
    freeze: Setting | None = None  # <CNN_archi freeze="none|encoder">
    seed: Setting | None = None
    output: Setting | None = None
    virtual: Setting | None = None  # <parallelism-degree virtual="k">: ranks each process emulates
    # KEY=VALUE overrides applied on top of the file (generator/overrides.py); passed on to the workers
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def base_dir(self) -> Path:
        return self.file.parent


def _where(path: Path, el) -> Location:
    return Location(path, el.sourceline or 0, 1)


def _text(el) -> str:
    return (el.text or "").strip()


def _resolve(base: Path, text: str) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _named(path: Path, els, kind: str) -> list[Setting]:
    seen: dict[str, Location] = {}
    out = []
    for el in els:
        name, where = el.get("name"), _where(path, el)
        if name in seen:
            raise JobError(where, f"{kind} '{name}' is given twice (first at line {seen[name].line})",
                           "keep one of them")
        seen[name] = where
        out.append(Setting(name, _text(el), where))
    return out


def read_job(file: Path | str, text: str | None = None) -> JobSpec:
    """Parse and schema-check a job file into a JobSpec (raises JobError); ``text``: the file as recorded
    (e.g. in a checkpoint), read as if it were at ``file``."""
    path = Path(os.path.abspath(file))
    # refuses what is no readable file: a symbolic-link loop, a path too long
    recorded = None if text is None else re.sub(r"^(\s*<\?xml[^>]*?)\s+encoding=[\"'][^\"']*[\"']", r"\1", text)
    root, text = read_xml(path, None if recorded is None else recorded.encode("utf-8"))
    if path.exists():
        path = path.resolve()
    task = root.find("task")
    base = path.parent

    def section(tag):
        return task.find(tag)

    def props(tag):
        el = section(tag)
        return [] if el is None else _named(path, el.findall("property"), f"<{tag}> property")

    def holder(tag) -> Setting | None:
        el = section(tag)
        if el is None:
            return None
        p = el.find("path")
        return Setting(tag, str(_resolve(base, _text(p))), _where(path, p))

    arch = section("CNN_archi")
    arch_path = arch.find("path")
    if arch_path is None and not arch.get("name"):
        raise JobError(_where(path, arch), "<CNN_archi> names no architecture",
                       "add name=\"unet\" (or fcn) or a <path> to a Python/Keras architecture file")
    if arch_path is not None and arch.get("name"):
        raise JobError(_where(path, arch), "<CNN_archi> has both name= and <path>",
                       "keep name= for a built-in architecture or <path> for your own file")
    architecture = Choice(arch.get("name"), _resolve(base, _text(arch_path)) if arch_path is not None else None,
                          arch.get("entry"), _where(path, arch))

    data = section("data")
    data_paths = {}
    for part in ("train", "valid", "test"):
        el = data.find(part)
        if el is not None:
            p = el.find("path")
            data_paths[part] = Setting(part, str(_resolve(base, _text(p))), _where(path, p))

    actions: list[ActionSpec] = []
    modules: dict[str, Location] = {}
    gen = section("CNN-Parallelism-Generator")
    for mod in ([] if gen is None else gen.findall("module")):
        modules.setdefault(mod.get("name"), _where(path, mod))
        for act in mod.findall("action"):
            actions.append(_action(path, base, mod.get("name"), act))

    attribute = {key: Setting(key, arch.get(key), _where(path, arch)) for key in ("pretrained", "freeze")
                 if arch.get(key) is not None}
    return JobSpec(
        file=path, task=task.get("name"), where=_where(path, task),
        pretrained=attribute.get("pretrained"), freeze=attribute.get("freeze"),
        degree=Setting("parallelism-degree", _text(section("parallelism-degree")),
                       _where(path, section("parallelism-degree"))),
        architecture=architecture,
        architecture_params=_named(path, arch.findall("param"), "<CNN_archi> param"),
        text=text, data_format=Choice(data.get("format"), None, None, _where(path, data)),
        data_paths=data_paths,
        data_params=_named(path, data.findall("param"), "<data> param"),
        actions=actions, modules=modules,
        hyperparameters=props("hyperparameters"), monitoring=props("monitoring"), cluster=props("cluster"),
        federation=props("federation"),
        seed=None if section("seed") is None else Setting("seed", _text(section("seed")), _where(path, section("seed"))),
        output=holder("output"), virtual=_virtual(path, section("parallelism-degree")),
    )


def _virtual(path: Path, degree) -> Setting | None:
    """The ``virtual`` attribute of ``<parallelism-degree>``, if written."""
    text = None if degree is None else degree.get("virtual")
    return None if text is None else Setting("virtual", text.strip(), _where(path, degree))


def _action(path: Path, base: Path, module: str, act) -> ActionSpec:
    spec = ActionSpec(module=module, type=act.get("type"), extensible=act.get("class") == "extensible",
                      where=_where(path, act))
    names: dict[str, Location] = {}
    for val in act.findall("value"):
        where, name, p = _where(path, val), val.get("name"), val.find("path")
        text = _text(val)
        if p is not None and text:
            raise JobError(where, "a <value> holds both text and a <path>", "keep one of them")
        if p is None and not text:
            raise JobError(where, "empty <value>", "write the implementation name, a parameter value or a <path>")
        key = name or ""
        if key in names:
            what = f"value '{name}'" if name else "the implementation (an unnamed <value>)"
            raise JobError(where, f"{what} is given twice in this action (first at line {names[key].line})",
                           "keep one of them")
        names[key] = where
        file = _resolve(base, _text(p)) if p is not None else None
        if name is None:
            spec.choice = Choice(None if file else text, file, val.get("entry"), where)
        elif file is not None:
            spec.plugins[name] = Choice(name, file, val.get("entry"), where)
        else:
            spec.params.append(Setting(name, text, where))
    return spec
