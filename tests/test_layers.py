"""The layers: every import, also one made inside a function, goes to the same layer or a lower one.

core < engine < generator < data, training < components < run, tracking, inference < tuning, api, cli. So the core
imports nothing above it, nothing below run/ imports it, and the engine never imports torch. One exception:
the package itself (``autocnnp/__init__.py``) re-exports the API, imported inside a function on first use.
And no modules import each other in a circle (the same exception aside)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autocnnp"
LAYERS = {"core": 0, "engine": 1, "generator": 2, "data": 3, "training": 3, "components": 4, "run": 5, "tracking": 5,
          "inference": 5, "export": 5, "tuning": 6, "federation": 6, "api": 6, "cli": 6, "__main__": 7, "templates": 0,
          "__init__": 0}
MODULES = sorted(PACKAGE.rglob("*.py"))


def layer_of(module: str) -> int:
    """The layer of ``autocnnp.x.y`` (by its first part below autocnnp)."""
    parts = module.split(".")
    first = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS[first if first in LAYERS else "__init__"]  # a name of the package itself (__version__)


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def typing_only(tree: ast.AST) -> set[ast.AST]:
    """The nodes under ``if TYPE_CHECKING:`` (imported for annotations, never at run time)."""
    blocks = [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test).endswith("TYPE_CHECKING")]
    return {inner for block in blocks for stmt in block.body for inner in ast.walk(stmt)}


def imports(path: Path, run_time: bool = False) -> list[tuple[str, int]]:
    """The autocnnp modules ``path`` imports, anywhere in it, with their lines (``run_time``: not those
    imported for type checking only)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []
    tree = ast.parse(path.read_bytes())
    skipped = typing_only(tree) if run_time else set()
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from package import module` imports the module
            targets = [f"{base}.{a.name}" if (node.module is None or is_module(f"{base}.{a.name}")) else base
                       for a in node.names]
            out += [(t, node.lineno) for t in targets if t.startswith("autocnnp")]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("autocnnp")]
    return out


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_no_import_runs_back_up(path):
    here = layer_of(module_name(path))
    upward = [f"line {line}: {target}" for target, line in imports(path)
              if layer_of(target) > here and target not in lazy(path)]
    assert not upward, f"{path.relative_to(PACKAGE)} (layer {here}) imports from higher layers: {upward}"


def lazy(path: Path) -> set[str]:
    """The imports of ``path`` made on first use that may run up: the package's re-export of the API."""
    return {"autocnnp.api"} if path == PACKAGE / "__init__.py" else set()


def import_cycle() -> list[str]:
    """One chain of modules of the package that import each other in a circle at run time (empty: none)."""
    modules = {module_name(p): p for p in MODULES}

    def module_of(target: str) -> str:  # autocnnp.x.y.Name -> autocnnp.x.y
        while target not in modules:
            target = target.rpartition(".")[0]
        return target

    graph = {name: sorted({module_of(t) for t, _ in imports(path, run_time=True) if t not in lazy(path)} - {name})
             for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, chain: list[str]) -> list[str]:
        if name in chain:
            return chain[chain.index(name):] + [name]
        if name in done:
            return []
        for target in graph[name]:
            if cycle := visit(target, [*chain, name]):
                return cycle
        done.add(name)
        return []

    return next((cycle for name in graph if (cycle := visit(name, []))), [])


def test_no_import_cycle():
    cycle = import_cycle()
    assert not cycle, "modules import each other in a circle (also inside functions): " + " -> ".join(cycle)


def test_every_module_is_in_a_layer():
    assert {module_name(p).split(".")[1] if "." in module_name(p) else "__init__" for p in MODULES} <= set(LAYERS)


def test_core_and_engine_import_no_torch_and_nothing_above_them():
    core_and_engine = [module_name(p) for p in MODULES if module_name(p).split(".")[1:2] in (["core"], ["engine"])]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in core_and_engine) +
            "loaded = [m for m in sys.modules if m == 'torch' or m.startswith(('autocnnp.generator', 'autocnnp.run'))]\n"
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
