"""The site's reference, generated from autocnnp's code (nothing of it is written by hand):

* ``autocnnp-job-file``: every element and attribute of the job file's XSD with its xs:documentation;
* ``autocnnp-settings SECTION``: the Config of a job-file section (``monitoring``, ``cluster``);
* ``autocnnp-points``: every extension point of the generator tree, its protocol, its built-ins per framework
  and their Configs (defaults, bounds, other spellings, help), and the ``<monitoring>`` trackers;
* ``autocnnp-protocols``: every class of generator/protocols.py (autodoc);
* ``autocnnp-tree``: the generator tree (composites, modules, actions, what they hand each other);
* ``autocnnp-commands``: every command and option of the argparse parsers;
* ``autocnnp-exit-codes``: ``ExitCode`` with the comment of each member;
* ``autocnnp-run-folder``: ``RunDir``'s layout (core/rundir.py's docstring);
* ``autocnnp-docstring MODULE``: a module's docstring (the points table, the ``--set`` keys).

What the reference cannot say is a warning, so an error in ``make docs``: a Config field without help, an
element or attribute of the XSD without ``xs:documentation``, an ExitCode member without a comment, a path of
``RunDir`` outside its layout.

Every setting, command and option gets an HTML id (:func:`setting_id`, :func:`command_id`, :func:`option_id`)
that tests/test_docs.py looks for in the built site. Nothing here imports torch or TensorFlow: the registries
read the built-ins' Configs from their files' text.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.parsing import nested_parse_to_nodes

logger = logging.getLogger(__name__)
XS = "{http://www.w3.org/2001/XMLSchema}"


# --- the ids tests/test_docs.py looks for --------------------------------------------------------------

def config_name(config: type) -> str:
    """``module.Class`` of a Config (a built-in's Config is read into ``<module>.__header__``)."""
    return f"{config.__module__.removesuffix('.__header__')}.{config.__qualname__}"


def setting_id(config_module_class: str, field: str) -> str:
    return nodes.make_id(f"setting {config_module_class} {field}")


def command_id(words: list[str]) -> str:
    return nodes.make_id("command " + " ".join(words))


def option_id(words: list[str], option: str) -> str:
    return nodes.make_id("option " + " ".join(words) + " " + option)


# --- small node builders -----------------------------------------------------------------------------------

def _para(*children) -> nodes.paragraph:
    return nodes.paragraph("", "", *[nodes.Text(c) if isinstance(c, str) else c for c in children])


def _table(header: list[str] | None, rows: list[list], widths: list[int]) -> nodes.table:
    """A table whose cells are strings or nodes (no header row when ``header`` is None)."""
    group = nodes.tgroup(cols=len(widths))
    group += [nodes.colspec(colwidth=w) for w in widths]
    head, body = nodes.thead(), nodes.tbody()
    group += [head, body] if header else [body]
    for target, cells in ([(head, header)] if header else []) + [(body, r) for r in rows]:
        row = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            entry += cell if isinstance(cell, nodes.Node) else _para(cell)
            row += entry
        target += row
    table = nodes.table(classes=["autocnnp-reference"])
    table += group
    return table


def _code(text: str, *ids: str, seen: set[str] | None = None) -> nodes.paragraph:
    """``text`` as code carrying ``ids`` (those not in ``seen``, the ids the page has already: HTML ids are
    unique)."""
    literal = nodes.literal(text, text)
    literal["ids"] = [i for i in dict.fromkeys(ids) if seen is None or i not in seen]
    if seen is not None:
        seen.update(ids)
    return _para(literal)


def _section(title: str, ids: str, *children) -> nodes.section:
    section = nodes.section(ids=[ids], names=[ids])
    section += nodes.title(title, title)
    section += list(children)
    return section


# --- Configs -------------------------------------------------------------------------------------------

def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "required"


def _bounds(meta) -> str:
    parts = [f">= {meta['min']}" if "min" in meta else "", f"<= {meta['max']}" if "max" in meta else "",
             f"> {meta['gt']}" if "gt" in meta else "", "must exist" if meta.get("must_exist") else ""]
    return ", ".join(p for p in parts if p)


def declared_in(config: type, field: str) -> type:
    """The class of ``config``'s MRO that declares ``field`` (a base Config shared by several components)."""
    return next(c for c in config.__mro__ if field in c.__dict__.get("__annotations__", {}))


def config_table(config: type, seen: set[str]) -> nodes.table:
    """One row per field of a Config: name (with its ids: this Config's, and the declaring base's), type,
    default, bounds, other spellings, help."""
    from autocnnp.engine.values import type_name

    hints = typing.get_type_hints(config)
    name = config_name(config)
    for f in dataclasses.fields(config):
        if not f.metadata.get("help"):
            logger.warning(f"{name}.{f.name} has no help: write setting(..., help=...)")
    rows = [[_code(f.name, setting_id(name, f.name), setting_id(config_name(declared_in(config, f.name)), f.name),
                   seen=seen), type_name(hints[f.name]), _code(_default(f)),
             _bounds(f.metadata), ", ".join(f.metadata.get("aliases", ())), f.metadata.get("help", "")]
            for f in dataclasses.fields(config)]
    return _table(["setting", "type", "default", "bounds", "also spelt", "help"], rows, [14, 10, 10, 8, 10, 40])


def _config_block(config: type | None, seen: set[str]) -> list[nodes.Node]:
    if config is None:
        return [_para("No parameters.")]
    return [_para("Config ", nodes.literal(text=config_name(config)), ":"), config_table(config, seen)]


def _seen(directive: SphinxDirective) -> set[str]:
    """The setting ids the page being read has already."""
    return directive.env.temp_data.setdefault("autocnnp_ids", set())


def section_configs(section: str) -> list[type]:
    """The Configs a job-file section binds (what run/job.py binds it to)."""
    if section == "cluster":
        from autocnnp.run.config import CLUSTER_CONFIGS

        return list(CLUSTER_CONFIGS)
    if section == "monitoring":
        from autocnnp.training.monitor import MonitoringConfig

        return [MonitoringConfig]
    if section == "federation":
        from autocnnp.federation.config import FederationConfig

        return [FederationConfig]
    raise ValueError(f"no section {section!r}: monitoring, cluster or federation")


class SettingsDirective(SphinxDirective):
    """``.. autocnnp-settings:: monitoring|cluster|federation``: the section's Configs."""

    required_arguments = 1

    def run(self):
        out = []
        for config in section_configs(self.arguments[0]):
            out += [_para(inspect.getdoc(config) or ""), *_config_block(config, _seen(self))]
        return out


# --- extension points ------------------------------------------------------------------------------------

def _implementations(registry) -> list:
    """Every built-in entry of a registry, each implementation once (aliases are listed on it)."""
    return [entry for name in registry.names() for entry in registry.builtins(name) if entry.name == name]


def _entry_block(entry, point_id: str, seen: set[str]) -> nodes.section:
    frameworks = ", ".join(entry.frameworks) or "any"
    title = f"{entry.name} ({frameworks})"
    facts = [f"frameworks: {frameworks}"]
    if entry.aliases:
        facts.append("also named " + ", ".join(entry.aliases))
    if entry.requires:
        facts.append("requires " + "; ".join(f"{k}: {', '.join(v)}" for k, v in entry.requires.items()))
    if entry.launchers:
        facts.append("launchers: " + ", ".join(entry.launchers))
    return _section(title, nodes.make_id(f"{point_id} {entry.name} {frameworks}"), _para(entry.summary),
                    _para("; ".join(facts) + "."), *_config_block(entry.config, seen))


def _point_facts(point) -> nodes.Node:
    from autocnnp.generator.points import SET_ELSEWHERE

    rows = [["module", point.module],
            ["class", "extensible (a user file or an installed entry point may implement it)" if point.extensible
             else "non_extensible (built-ins and installed entry points only)"],
            ["default", point.default or "none"],
            ["chosen by", _code(SET_ELSEWHERE.get(point.type, f'<action type="{point.type}">'))],
            ["also named", ", ".join(point.aliases) or "-"],
            ["entry-point group", _code(f"autocnnp.{point.noun or point.type}")],
            ["a user file defines", _code(point.file_entry)],
            ["consumes", ", ".join(point.consumes) or "-"],
            ["provides", ", ".join(point.provides) or "-"],
            ["protocol", ", ".join(f"{base.__name__} ({framework or 'any framework'})"
                                   for framework, base in point.protocols) or "see the table above"]]
    return _table(None, rows, [15, 60])


class PointsDirective(SphinxDirective):
    """``.. autocnnp-points::``: every extension point, its built-ins and their Configs, then the trackers."""

    def run(self):
        from autocnnp.generator.points import POINTS, TRACKERS

        out = []
        for point in POINTS:
            point_id = nodes.make_id(f"point {point.type}")
            blocks = [_entry_block(entry, point_id, _seen(self)) for entry in _implementations(point.registry)]
            out.append(self._labelled(f"{point.type}: {point.title}", point_id, _point_facts(point), *blocks))
        trackers = [_entry_block(entry, "tracker", _seen(self)) for entry in _implementations(TRACKERS)]
        intro = _para("Trackers are no action of the generator tree: ", nodes.literal(text="<monitoring>"),
                      "'s tracker property names one or several (comma-separated); their settings are ",
                      nodes.literal(text="<monitoring>"), " properties too.")
        out.append(self._labelled("tracker: Run Tracking", "point-tracker", intro, *trackers))
        return out

    def _labelled(self, title: str, ids: str, *children) -> nodes.section:
        """A section other pages link to with ``:ref:`ids``` (``point-dist-strategy``)."""
        self.env.get_domain("std").note_hyperlink_target(ids, self.env.docname, ids, title)
        return _section(title, ids, *children)


class TreeDirective(SphinxDirective):
    """``.. autocnnp-tree::``: composites, modules and actions of the generator tree as nested lists."""

    def run(self):
        from autocnnp.generator.points import COMPOSITES, MODULES, POINTS

        tree = nodes.bullet_list()
        for composite, title in COMPOSITES.items():
            modules = nodes.bullet_list()
            for module in (m for m in MODULES if m.composite == composite):
                actions = nodes.bullet_list()
                for p in (p for p in POINTS if p.module == module.name):
                    flows = "".join([f"; consumes {', '.join(p.consumes)}" if p.consumes else "",
                                     f"; provides {', '.join(p.provides)}" if p.provides else ""])
                    kind = "extensible" if p.extensible else "non-extensible"
                    ref = addnodes.pending_xref("", nodes.literal(text=p.type), refdomain="std", reftype="ref",
                                                reftarget=nodes.make_id(f"point {p.type}"), refexplicit=True)
                    actions += nodes.list_item("", _para(ref, f" {p.title} ({kind}{flows})"))
                item = _para(nodes.strong(text=module.title), " ", nodes.literal(text=f'<module name="{module.name}">'))
                modules += nodes.list_item("", item, actions)
            tree += nodes.list_item("", _para(nodes.strong(text=title), " (composite)"), modules)
        root = nodes.list_item("", _para(nodes.strong(text="CNN-Parallelism-Generator")), tree)
        return [nodes.bullet_list("", root)]


# --- the job file's XSD ----------------------------------------------------------------------------------

def _doc(node) -> str:
    text = node.findtext(f"{XS}annotation/{XS}documentation") or ""
    return " ".join(text.split())


def _occurs(node) -> str:
    low, high = node.get("minOccurs", "1"), node.get("maxOccurs", "1")
    return {("1", "1"): "required", ("0", "1"): "optional", ("0", "unbounded"): "any number",
            ("1", "unbounded"): "one or more"}.get((low, high), f"{low}..{high}")


def _complex_type(node, types: dict):
    named = node.get("type")
    return types.get(named) if named else node.find(f"{XS}complexType")


def _attributes(ctype) -> list:
    """The attributes a complex type declares (its own, not those of the elements inside it)."""
    if ctype is None:
        return []
    holders = [ctype, *ctype.iterfind(f"{XS}simpleContent/{XS}extension"),
               *ctype.iterfind(f"{XS}complexContent/{XS}extension")]
    return [a for holder in holders for a in holder.findall(f"{XS}attribute")]


def _children(ctype) -> list:
    """The element declarations directly inside a complex type (through its sequence or all)."""
    if ctype is None:
        return []
    return [e for group in ctype if group.tag in (f"{XS}sequence", f"{XS}all") for e in group
            if e.tag == f"{XS}element"]


def xsd_rows(node, types: dict, parents: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object, list]]:
    """``(path, element declaration, attributes)`` of ``node`` and every element below it, depth first."""
    path = (*parents, node.get("name"))
    ctype = _complex_type(node, types)
    rows = [(path, node, _attributes(ctype))]
    for child in _children(ctype):
        rows += xsd_rows(child, types, path)
    return rows


def job_schema():
    from lxml import etree

    import autocnnp.engine

    return etree.parse(str(Path(autocnnp.engine.__file__).parent / "schema" / "job.xsd")).getroot()


class JobFileDirective(SphinxDirective):
    """``.. autocnnp-job-file::``: the job file's elements and attributes, from the XSD; an element or attribute
    without ``xs:documentation`` is a warning (a ``name`` attribute explains itself)."""

    def run(self):
        schema = job_schema()
        types = {t.get("name"): t for t in schema if t.tag == f"{XS}complexType"}
        root = schema.find(f"{XS}element")
        rows = []
        for path, element, attributes in xsd_rows(root, types):
            name = "/".join(path)
            ctype = _complex_type(element, types)
            doc = _doc(element) or (_doc(ctype) if ctype is not None else "")
            for undocumented in ([] if doc else [name]) + [f"{name} @{a.get('name')}" for a in attributes if not _doc(a)
                                                       and a.get("name") != "name"]:
                logger.warning(f"job.xsd: {undocumented} has no xs:documentation", location=self.get_location())
            attrs = nodes.bullet_list()
            for a in attributes:
                text = f" ({'required' if a.get('use') == 'required' else 'optional'}) {_doc(a)}"
                attrs += nodes.list_item("", _para(nodes.literal(text=a.get("name")), text))
            rows.append([_code(f"<{path[-1]}>", nodes.make_id(f"element {name}")), _para(name.replace("/", " / ")),
                         _occurs(element), attrs if attributes else "-", doc])
        return [_table(["element", "inside", "occurs", "attributes", "meaning"], rows, [14, 18, 8, 25, 35])]


# --- commands ----------------------------------------------------------------------------------------------

def commands(parser: argparse.ArgumentParser, names: list[list[str]] | None = None, help_text: str = ""):
    """``(names, parser, help)`` of the program and each of its subcommands, depth first; ``names`` are the
    command's words, first as documented, then each alias's."""
    names = names or [[parser.prog]]
    out = [(names, parser, help_text)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            spellings: dict[int, list[str]] = {}
            for name, sub in action.choices.items():  # an alias names the same parser
                spellings.setdefault(id(sub), []).append(name)
            for sub in {id(s): s for s in action.choices.values()}.values():
                subnames = [[*words, name] for words in names for name in spellings[id(sub)]]
                out += commands(sub, subnames, helps.get(spellings[id(sub)][0], ""))
    return out


def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments a command takes (help and subcommand choices left out)."""
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def option_name(action: argparse.Action) -> str:
    """The name an argument is documented under: its longest option string, or its dest for a positional."""
    return max(action.option_strings, key=len) if action.option_strings else action.dest


def _argument_row(names: list[list[str]], parser, action: argparse.Action) -> list:
    shown = ", ".join(action.option_strings) or str(action.metavar or action.dest)
    if action.option_strings and action.nargs != 0:
        shown += " " + (action.metavar if isinstance(action.metavar, str) else action.dest.upper())
    help_text = parser._get_formatter()._expand_help(action) if action.help else ""
    facts = []
    if action.choices:
        facts.append("one of " + ", ".join(map(str, action.choices)))
    if action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in (action.help or ""):
        facts.append(f"default {action.default}")
    if isinstance(action, argparse._AppendAction) and "repeatable" not in help_text:
        facts.append("repeatable")
    ids = [option_id(words, option_name(action)) for words in names]
    return [_code(shown, *ids), " ".join([help_text, *(f"({f})" for f in facts)])]


class CommandsDirective(SphinxDirective):
    """``.. autocnnp-commands::``: every command of ``autocnnp`` with its usage and arguments."""

    def run(self):
        from autocnnp.cli import parser as make_parser

        out = []
        for names, parser, help_text in commands(make_parser()):
            usage = parser.format_usage().removeprefix("usage: ").strip()
            body: list[nodes.Node] = [_para(parser.description or help_text)] if (parser.description or help_text) else []
            if len(names) > 1:
                body.append(_para("Also spelt: ", ", ".join(" ".join(words) for words in names[1:]), "."))
            body.append(nodes.literal_block(usage, usage, language="text"))
            rows = [_argument_row(names, parser, a) for a in arguments(parser)]
            if rows:
                body.append(_table(["argument", "meaning"], rows, [25, 60]))
            section = _section(" ".join(names[0]), command_id(names[0]), *body)
            section["ids"] += [command_id(words) for words in names[1:]]
            out.append(section)
        return out


# --- exit codes and the run folder -------------------------------------------------------------------------

def exit_codes() -> list[tuple[str, int, str]]:
    """``(name, value, meaning)`` of every ExitCode member, the meaning from its comment in the source."""
    from autocnnp.core.errors import ExitCode

    comments = dict(re.findall(r"^\s+(\w+) = \d+\s*#\s*(.*)$", inspect.getsource(ExitCode), re.M))
    return [(member.name, member.value, comments.get(member.name, "")) for member in ExitCode]


class ExitCodesDirective(SphinxDirective):
    """``.. autocnnp-exit-codes::``: ExitCode's members."""

    def run(self):
        from autocnnp.core.errors import ExitCode

        for name, _, meaning in exit_codes():
            if not meaning:
                logger.warning(f"ExitCode.{name} has no comment saying what it means", location=self.get_location())
        rows = [[_code(str(value) + ("+N" if name == "INTERRUPTED" else ""), nodes.make_id(f"exit {name}")),
                 _code(name), meaning] for name, value, meaning in exit_codes()]
        return [_para(inspect.getdoc(ExitCode) or ""), _table(["code", "ExitCode", "meaning"], rows, [8, 14, 70])]


def run_folder_layout() -> list[tuple[str, str]]:
    """``(path, what)`` of every line of RunDir's layout (core/rundir.py's docstring)."""
    import autocnnp.core.rundir as rundir

    return re.findall(r"^\s+OUTPUT/(\S*)\s+(.*)$", rundir.__doc__ or "", re.M)


def run_dir_paths() -> dict[str, str]:
    """``{member: path relative to the run folder}`` of every path RunDir names (methods called with "N" for each
    argument, as the layout writes ``rankN``)."""
    from autocnnp.core.rundir import RunDir

    run = RunDir(Path("/OUTPUT"))
    out = {}
    for name, member in vars(RunDir).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            value = getattr(run, name)
        elif inspect.isfunction(member):
            value = member(run, *["N"] * (len(inspect.signature(member).parameters) - 1))
        else:
            continue
        for path in value if isinstance(value, (tuple, list)) else [value]:
            if isinstance(path, Path) and path != run.root:
                out[f"{name} ({path.relative_to(run.root)})"] = str(path.relative_to(run.root))
    return out


class RunFolderDirective(SphinxDirective):
    """``.. autocnnp-run-folder::``: the layout of a run's output folder; a path RunDir names that the layout
    leaves out is a warning (an error in ``make docs``)."""

    def run(self):
        layout = run_folder_layout()
        listed = [p.rstrip("/") for p, _ in layout]
        for member, path in run_dir_paths().items():
            parts = Path(path).parts
            if not any(Path(p).parts[:len(parts)] == parts or parts[:len(Path(p).parts)] == Path(p).parts
                       for p in listed):
                logger.warning(f"RunDir.{member} is not in core/rundir.py's layout", location=self.get_location())
        rows = [[_code("OUTPUT/" + path, nodes.make_id(f"run folder {path}")), _para(*self.parse_inline(what)[0])]
                for path, what in layout]
        return [_table(["path", "what"], rows, [25, 60])]


class ProtocolsDirective(SphinxDirective):
    """``.. autocnnp-protocols::``: every public class of generator/protocols.py with its members (autodoc)."""

    def run(self):
        import autocnnp.generator.protocols as protocols

        classes = [name for name, obj in vars(protocols).items() if inspect.isclass(obj) and not name.startswith("_")
                   and obj.__module__ == protocols.__name__]
        text = "\n\n".join(f".. autoclass:: {protocols.__name__}.{name}\n   :members:\n   :no-index:" for name in classes)
        return nested_parse_to_nodes(self.state, text, source=protocols.__file__)


class DocstringDirective(SphinxDirective):
    """``.. autocnnp-docstring:: module``: a module's docstring, as reStructuredText."""

    required_arguments = 1

    def run(self):
        import importlib

        doc = inspect.getdoc(importlib.import_module(self.arguments[0])) or ""
        return nested_parse_to_nodes(self.state, doc, source=self.arguments[0])


def setup(app):
    for name, directive in (("autocnnp-job-file", JobFileDirective), ("autocnnp-settings", SettingsDirective),
                            ("autocnnp-points", PointsDirective), ("autocnnp-tree", TreeDirective),
                            ("autocnnp-commands", CommandsDirective), ("autocnnp-exit-codes", ExitCodesDirective),
                            ("autocnnp-run-folder", RunFolderDirective), ("autocnnp-docstring", DocstringDirective),
                            ("autocnnp-protocols", ProtocolsDirective)):
        app.add_directive(name, directive)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
