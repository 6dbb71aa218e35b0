"""One small registry per extension point (detectron2 style).

An implementation comes from one of three places, and the plan says which:

* **built-in**: a file of ``autocnnp/components/<folder>/``, one component per file, declared by
  the marker ``@component("name")`` on its implementation; its parameters are the file's ``Config``
  dataclass. Built-ins are found *without importing them* (their modules import torch, and validating
  a job must not): the file is parsed, and only its ``*Config`` dataclasses, with the torch-free
  imports and constants they use, are executed. tests/test_registry.py checks that this
  reading equals what importing the module gives;
* **an installed distribution** declaring an entry point in the group ``autocnnp.<point>``; its
  parameters are the implementation's ``Config`` attribute;
* **a Python file named in the job** (checked by AST, never executed until the generator is built);
  without ``entry=``, its one definition that fits the point is used.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import JobError, Location, did_you_mean
from ..core.files import read_input
from .protocols import SizeRule, first_paragraph, summary

COMPONENTS = Path(__file__).resolve().parent.parent / "components"
COMPONENTS_PACKAGE = "autocnnp.components"
# imports a Config may use: executed by the torch-free reading of a built-in file
_LIGHT_MODULES = ("__future__", "dataclasses", "typing", "pathlib", "enum", "math", "re", "autocnnp.core",
                  "autocnnp.generator.protocols")


def component(name: str, *, aliases: tuple[str, ...] = (), frameworks: tuple[str, ...] = ("torch",)):
    """Mark the implementation of a built-in component (read by the registry from the file's text;
    the file's ``Config`` dataclass holds its parameters) for the ``frameworks`` it trains with: one name
    may have one implementation per framework (torch, tensorflow). Returns the object unchanged."""
    del name, aliases, frameworks
    return lambda obj: obj


@dataclass(frozen=True)
class Entry:
    """A registered implementation of one extension point."""

    name: str
    target: str  # "module:attr", or "/path/file.py:attr" for a user file
    config: type | None = None
    summary: str = ""
    origin: str = "built-in"
    requires: dict[str, tuple[str, ...]] = field(default_factory=dict)
    launchers: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    frameworks: tuple[str, ...] = ()  # the frameworks it trains with (empty: not declared, a user file's)
    input_sizes: SizeRule | None = None  # an architecture's declared size rule (a built-in's is its Config's)

    @property
    def file(self) -> Path | None:
        """The user file this entry comes from, if any."""
        return Path(self.target.rsplit(":", 1)[0]) if self.origin.startswith("file ") else None

    def load(self):
        """Import and return the implementation object."""
        location, _, attr = self.target.rpartition(":")
        if self.file is not None:
            return getattr(load_file(self.file), attr)
        obj = importlib.import_module(location)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj


@dataclass(frozen=True)
class Fits:
    """What a user file's definition must look like to implement a point (used without entry=)."""

    bases: tuple[str, ...] = ()  # a class deriving from one of these names
    methods: tuple[str, ...] = ()  # or a class defining all of these methods
    functions: bool = False  # any public function fits too


class Registry:
    """Name -> Entry for one extension point."""

    def __init__(self, point: str, folder: str, file_entry: str, fits: Fits):
        self.point, self.folder, self.file_entry, self.fits = point, folder, file_entry, fits
        self.extra: dict[str, Entry] = {}  # implementations registered in this process (an interactive session, a test)

    # --- built-ins and installed distributions ---

    def _files(self) -> list[Path]:
        return sorted((COMPONENTS / self.folder).glob("*.py"))

    def names(self, framework: str | None = None) -> list[str]:
        """The built-in names (those implemented for ``framework`` when given)."""
        return sorted({name for path in self._files() for name, _, _, frameworks in _marks(path)
                       if framework is None or framework in frameworks}
                      | {name for name, e in self.extra.items() if _runs_on(e, framework)})

    def builtins(self, name: str) -> list[Entry]:
        """Every framework's built-in implementation called ``name`` (or aliased so)."""
        if name in self.extra:
            return [self.extra[name]]
        if not name.isidentifier() or len(name) > 100:  # a name, never a path: nothing else is read
            return []
        return [_entry(path, definition) for path in self._files() for key, definition in _keys(path) if key == name]

    def builtin(self, name: str, framework: str | None = "torch") -> Entry | None:
        """The built-in (or in-process registered) implementation called ``name`` for ``framework`` (None:
        any), if any. The file named after it is read first: most components live there (validate stays fast)."""
        own = COMPONENTS / self.folder / f"{name}.py"
        if name not in self.extra and name.isidentifier() and len(name) <= 100 and own.is_file():
            found = (_entry(own, definition) for key, definition in _keys(own) if key == name)
            entry = next((e for e in found if _runs_on(e, framework)), None)
            if entry is not None:
                return entry
        return next((e for e in self.builtins(name) if _runs_on(e, framework)), None)

    def get(self, name: str, where: Location, framework: str | None = "torch") -> Entry:
        """The entry called ``name`` for ``framework`` (None: any): built-in first, then installed entry
        points. A name implemented for other frameworks only is refused, naming this framework's choices."""
        entry = self.builtin(name, framework)
        if entry is not None:
            return entry
        others = sorted({f for e in self.builtins(name) for f in e.frameworks})
        if others:
            raise JobError(where, f"{self.point} '{name}' has no {framework} implementation (it exists for "
                           f"{', '.join(others)})", f"with framework {framework} choose one of: "
                           f"{', '.join(self.names(framework)) or 'none'}; or choose framework {others[0]}")
        from importlib.metadata import entry_points  # ~15 ms: only when a name is not built in

        points = entry_points(group=f"autocnnp.{self.point}", name=name)
        if points:
            ep = next(iter(points))
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plug-in must not look like a missing one
                raise JobError(where, f"{self.point} '{name}' from entry point {ep.value} fails to import: "
                               f"{type(exc).__name__}: {exc}", "fix or reinstall that distribution") from None
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else ep.value
            return Entry(name, ep.value, getattr(obj, "Config", None), summary(obj), f"entry point of {dist}",
                         dict(getattr(obj, "requires", {})), tuple(getattr(obj, "launchers", ())),
                         frameworks=_frameworks(getattr(obj, "frameworks", ())),
                         input_sizes=_size_rule(getattr(obj, "input_sizes", None), where))
        installed = [ep.name for ep in entry_points(group=f"autocnnp.{self.point}")]
        raise JobError(where, f"unknown {self.point} '{name}'", did_you_mean(name, self.names() + installed))

    # --- user files ---

    def from_file(self, path: Path, entry: str | None, where: Location, fits: Fits | None = None) -> Entry:
        """The implementation defined in a user file: ``entry`` if given, else the point's conventional
        symbol if the file defines it, else the file's only definition that fits the point (``fits``:
        another shape, for plug-ins). The file is parsed, not executed (it is imported when the
        generator is built)."""
        if not path.exists():
            raise JobError(where, f"the {self.point} file {path} does not exist",
                           "fix the <path> (relative paths are read from the job file's folder)")
        if path.suffix != ".py":
            raise JobError(where, f"{path} is not a Python file", f"point at a .py file defining {self.file_entry}")
        source = read_input(path, where, f"{self.point} file")
        try:
            tree = ast.parse(source, filename=str(path))  # bytes: the file's own coding declaration holds
        except (SyntaxError, ValueError) as exc:  # ValueError: a NUL byte
            raise JobError(Location(path, getattr(exc, "lineno", 0) or 0, getattr(exc, "offset", 0) or 0),
                           f"syntax error in {self.point} file: {getattr(exc, 'msg', exc)}",
                           "fix the Python file named by the job (its encoding is UTF-8 unless it declares "
                           "another, as # coding: latin-1)") from None
        defined = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
        assigned = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        fitting = self._candidates(defined, fits)
        symbol = entry or (self.file_entry if self.file_entry in defined or self.file_entry in assigned else None)
        if symbol is None and len(fitting) == 1:
            symbol = fitting[0]
        if symbol is None or symbol not in defined and symbol not in assigned:
            if entry is None and fitting:
                hint = did_you_mean(self.file_entry, fitting)
                problem = f"{path} defines several candidates for {self.point} and no '{self.file_entry}'"
            else:
                names = sorted(defined) + sorted(assigned)
                hint = did_you_mean(symbol or self.file_entry, names) if names else "the file defines nothing"
                problem = f"{path} defines no '{symbol or self.file_entry}' for {self.point}"
            raise JobError(where, problem, f"{hint}; or name the symbol with entry=\"...\" on the element")
        node = defined.get(symbol)
        attrs = _class_literals(node) if isinstance(node, ast.ClassDef) else {}
        attrs.setdefault("input_sizes", _class_literals(tree).get("input_sizes"))
        doc = ast.get_docstring(node) if node is not None else None
        return Entry(symbol, f"{path}:{symbol}", None, first_paragraph(doc or ast.get_docstring(tree)),
                     f"file {path}", dict(attrs.get("requires", {})), tuple(attrs.get("launchers", ())),
                     frameworks=_frameworks(attrs.get("frameworks", ())),
                     input_sizes=_size_rule(attrs.get("input_sizes"), where, path))

    def _candidates(self, defined: dict, fits: Fits | None) -> list[str]:
        """The file's public definitions that fit the point, a class deriving from a fitting class of the file
        included; a class that another candidate derives from is its base, not a candidate."""
        classes = {name for name, node in defined.items() if isinstance(node, ast.ClassDef)}

        def local_bases(name: str) -> set[str]:
            node = defined[name]
            return {_dotted(b).rsplit(".", 1)[-1] for b in node.bases} & classes if name in classes else set()

        fit: dict[str, bool] = {}

        def fits_point(name: str) -> bool:
            if name not in fit:
                fit[name] = False  # an inheritance cycle fits nothing
                fit[name] = self._fits(defined[name], fits) or any(fits_point(b) for b in local_bases(name))
            return fit[name]

        fitting = [name for name in defined if fits_point(name)]
        bases = {b for name in fitting for b in local_bases(name)}
        return [name for name in fitting if not name.startswith("_") and name not in bases]

    def _fits(self, node, fits: Fits | None) -> bool:
        fits = fits or self.fits
        if isinstance(node, ast.ClassDef):
            bases = {_dotted(b).rsplit(".", 1)[-1] for b in node.bases}
            methods = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            return bool(bases & set(fits.bases)) or bool(fits.methods) and set(fits.methods) <= methods
        return fits.functions or node.name == self.file_entry


def _frameworks(value) -> tuple[str, ...]:
    """A plug-in's ``frameworks`` attribute as a tuple of names (a single name is accepted)."""
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def _size_rule(value, where: Location, path: Path | None = None) -> SizeRule | None:
    """A plug-in's declared ``input_sizes`` (None: it declares none); a JobError when it is no size rule."""
    if value is None:
        return None
    try:
        return SizeRule.parse(value)
    except ValueError as exc:
        raise JobError(where, f"{path or 'the architecture'}: {exc}",
                       "fix input_sizes in the architecture, or remove it (any size is then taken)") from None


def _runs_on(entry: Entry, framework: str | None) -> bool:
    """Whether ``entry`` trains with ``framework`` (None: any; an entry that declares none: any)."""
    return framework is None or not entry.frameworks or framework in entry.frameworks


# --- reading built-in files without importing them -------------------------------------------------------

_HEADERS: dict[Path, types.ModuleType] = {}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return _dotted(node.func)
    return ""


def _module_name(path: Path) -> str:
    return ".".join([COMPONENTS_PACKAGE, *path.resolve().relative_to(COMPONENTS).with_suffix("").parts])


def _is_static(node) -> bool:
    """A constant the torch-free reading may execute: a literal, or a ``Literal[...]`` of literals."""
    if isinstance(node, ast.Subscript) and _dotted(node.value).rsplit(".", 1)[-1] == "Literal":
        node = node.slice
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def _light(node) -> bool:
    """An import the torch-free reading may execute (standard typing helpers and autocnnp's light layers)."""
    if isinstance(node, ast.ImportFrom):
        names = [] if node.level else [node.module or ""]
    else:
        names = [a.name for a in node.names]
    return bool(names) and all(any(n == m or n.startswith(m + ".") for m in _LIGHT_MODULES) for n in names)


def header(path: Path) -> types.ModuleType:
    """The torch-free part of a built-in file as a module: its light imports, literal constants and
    ``*Config`` dataclasses (sibling files' Configs imported with ``from .x import ...`` included)."""
    path = path.resolve()
    if path in _HEADERS:
        return _HEADERS[path]
    tree = _tree(path)
    module = types.ModuleType(f"{_module_name(path)}.__header__")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module  # so typing.get_type_hints resolves the Config's annotations
    body: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            sibling = header(path.with_name(f"{node.module}.py"))
            for alias in node.names:
                if hasattr(sibling, alias.name):
                    setattr(module, alias.asname or alias.name, getattr(sibling, alias.name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and _light(node):
            body.append(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None and _is_static(node.value):
            body.append(node)
        elif isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
            body.append(node)
    try:
        exec(compile(ast.Module(body, type_ignores=[]), str(path), "exec"), module.__dict__)
    except NameError as exc:
        raise RuntimeError(f"{path}: a Config uses {exc.name!r}, which the torch-free reading of built-in "
                           "components cannot see: write it as a literal, or import it from autocnnp.core or "
                           "autocnnp.generator.protocols") from None
    _HEADERS[path] = module
    return module


def _class_literals(node: ast.ClassDef | ast.Module, namespace: dict | None = None) -> dict:
    """Class (or a user file's top-level) attributes ``requires``, ``launchers``, ``frameworks`` and ``input_sizes``:
    literals of a user file (anything else is not evaluated, nothing of a user file runs), or expressions over
    a built-in's header ``namespace``."""
    out = {}
    for item in node.body:
        if isinstance(item, ast.Assign) and len(item.targets) == 1 and isinstance(item.targets[0], ast.Name) \
                and item.targets[0].id in ("requires", "launchers", "frameworks", "input_sizes"):
            if namespace is not None:  # a built-in: its own constants (MPI_LAUNCHERS)
                expression = compile(ast.Expression(item.value), "<component>", "eval")
                out[item.targets[0].id] = eval(expression, dict(namespace))
            elif _is_static(item.value):
                out[item.targets[0].id] = ast.literal_eval(item.value)
            elif item.targets[0].id == "input_sizes":  # a size rule that is no literal is refused, not ignored
                out["input_sizes"] = ast.unparse(item.value)
    return out


@functools.cache
def _marks(path: Path) -> tuple[tuple[str, tuple[str, ...], str, tuple[str, ...]], ...]:
    """``(name, aliases, definition, frameworks)`` of each ``@component(...)`` mark in a built-in file
    (parsed, not run)."""
    out = []
    for node in _definitions(path):
        for mark in node.decorator_list:
            if isinstance(mark, ast.Call) and _dotted(mark.func).rsplit(".", 1)[-1] == "component":
                keywords = {k.arg: ast.literal_eval(k.value) for k in mark.keywords}
                out.append((ast.literal_eval(mark.args[0]), tuple(keywords.get("aliases", ())), node.name,
                            tuple(keywords.get("frameworks", ("torch",)))))
    return tuple(out)


@functools.cache
def _tree(path: Path) -> ast.Module:
    """A built-in file parsed (once per process: the built-ins do not change while it runs)."""
    return ast.parse(path.read_bytes(), filename=str(path))


def _definitions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]:
    """The top-level functions and classes of a built-in file (parsed, not run)."""
    return [node for node in _tree(path).body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


def _keys(path: Path) -> list[tuple[str, str]]:
    """``(name or alias, definition)`` of every mark in a built-in file."""
    return [(key, definition) for name, aliases, definition, _ in _marks(path) for key in (name, *aliases)]


@functools.cache
def _entry(path: Path, definition: str) -> Entry:
    """The built-in ``definition`` of ``path``: its Config and class attributes read torch-free."""
    mod = header(path)
    node = next(n for n in _definitions(path) if n.name == definition)
    name, aliases, _, frameworks = next(m for m in _marks(path) if m[2] == definition)
    attrs = _class_literals(node, vars(mod)) if isinstance(node, ast.ClassDef) else {}
    return Entry(name, f"{_module_name(path)}:{definition}", getattr(mod, "Config", None),
                 first_paragraph(ast.get_docstring(node)), "built-in", dict(attrs.get("requires", {})),
                 tuple(attrs.get("launchers", ())), aliases, frameworks)


def load_file(path: Path) -> types.ModuleType:
    """Import a user file as a module (once per process)."""
    name = f"autocnnp_user_{abs(hash(str(path)))}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:  # not a Python source file (from_file has checked the suffix)
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module
