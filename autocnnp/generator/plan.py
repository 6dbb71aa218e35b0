"""Render an assembled generator as text: the tree, where each implementation comes from,
the bindings, the resolved hyperparameters and the launch command."""

from __future__ import annotations

import shlex

from ..engine.values import describe
from .assemble import Generator
from .tree import Composite, Module


def _params(config) -> str:
    values = describe(config)
    return ", ".join(f"{k}={v}" for k, v in values.items()) if values else ""


def render(gen: Generator, command: list[str]) -> str:
    virtual = f" ({gen.world_size} process(es) x {gen.virtual_ranks} virtual)" if gen.virtual_ranks > 1 else ""
    lines = [f"job: {gen.spec.file}", f"task: {gen.spec.task}   parallelism-degree: {gen.ranks}{virtual}   seed: {gen.seed}",
             f"output: {gen.rundir}", ""]

    def walk(node, depth):
        pad = "  " * depth
        if isinstance(node, Composite):
            lines.append(f"{pad}{node.title} (composite)")
            for child in node.children:
                walk(child, depth + 1)
        elif isinstance(node, Module):
            lines.append(f"{pad}{node.title} (module {node.name})")
            for a in node.actions:
                kind = "extensible" if a.point.extensible else "non-extensible"
                how = "" if a.explicit else ", default" if a.entry.name == a.point.default else ", chosen by the engine"
                params = _params(a.config) or ", ".join(f"{p.name}={p.text}" for p in a.settings)
                lines.append(f"{pad}  - {a.type} [{kind}] = {a.entry.name}  ({a.entry.origin}{how})")
                if params and a.type != "hyperparameters_injection":
                    lines.append(f"{pad}      {params}")
                for name, plugin in a.plugins.items():
                    lines.append(f"{pad}      plug-in {name}: {plugin.name} from {plugin.origin}")

    walk(gen.root, 0)
    lines += ["", "bindings:"]
    lines += [f"  {b.source} -> {b.target}: {b.carries}" for b in gen.bindings]
    lines += ["", "hyperparameters:"]
    lines += [f"  {k} = {v}" for k, v in describe(gen.hyperparameters).items()]
    lines += ["", "launch:", "  " + shlex.join(command)]
    return "\n".join(lines)
