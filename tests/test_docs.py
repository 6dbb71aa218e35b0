"""The documentation site (``make docs``): it builds with warnings as errors, and its generated reference holds
every Config field, command and option of the code, each found here from the code on its own."""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from autocnnp.cli import parser

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # builds the site: seconds


def reference():
    """The site's extension (docs/_ext), whose ids the tests look for; imported here, not when the tests are
    collected: Sphinx is installed by make docs and make test, not by make test-fast."""
    sys.path.insert(0, str(ROOT / "docs" / "_ext"))
    import autocnnp_reference

    return autocnnp_reference


@pytest.fixture(scope="module")
def site_ids(tmp_path_factory) -> set[str]:
    """The HTML ids of the site built from this checkout, as ``make docs`` builds it."""
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q",
                            str(ROOT / "docs"), str(out)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    return {i for page in out.rglob("*.html") for i in re.findall(r'\bid="([^"]+)"', page.read_text())}


def config_fields() -> list[tuple[str, str]]:
    """``(module.Class, field)`` of every field declared with ``setting(...)`` anywhere in the package."""
    found = []
    for path in sorted((ROOT / "autocnnp").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_bytes())):
            if isinstance(node, ast.ClassDef):
                found += [(f"{module}.{node.name}", item.target.id) for item in node.body
                          if isinstance(item, ast.AnnAssign) and isinstance(item.value, ast.Call)
                          and getattr(item.value.func, "id", "") == "setting" and isinstance(item.target, ast.Name)]
    return found


def command_options(p: argparse.ArgumentParser, words: list[str]) -> list[tuple[list[str], str | None]]:
    """``(command words, None)`` for each command and ``(command words, option)`` for each of its arguments."""
    out: list[tuple[list[str], str | None]] = [(words, None)]
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += command_options(sub, [*words, name])
        elif not isinstance(action, argparse._HelpAction):
            out.append((words, max(action.option_strings, key=len) if action.option_strings else action.dest))
    return out


def test_every_config_field_is_documented(site_ids):
    fields = config_fields()
    assert len(fields) > 50  # the walk finds the Configs (about a hundred settings)
    missing = [f"{config}.{name}" for config, name in fields if reference().setting_id(config, name) not in site_ids]
    assert not missing, f"Config fields missing from the site: {missing}"


def test_every_command_and_option_is_documented(site_ids):
    found = command_options(parser(), ["autocnnp"])
    assert any(words == ["autocnnp", "zoo", "publish"] for words, _ in found)
    ref = reference()
    missing = [" ".join(words) + (f" {option}" if option else "") for words, option in found
               if (ref.option_id(words, option) if option else ref.command_id(words)) not in site_ids]
    assert not missing, f"commands or options missing from the site: {missing}"


def test_every_exit_code_is_documented(site_ids):
    from docutils.nodes import make_id

    from autocnnp.core.errors import ExitCode

    assert not [code.name for code in ExitCode if make_id(f"exit {code.name}") not in site_ids]


def test_every_name_of_the_python_api_is_documented(site_ids):
    import autocnnp

    missing = [name for name in autocnnp.API if f"autocnnp.api.{name}" not in site_ids]
    assert not missing, f"Python API names missing from the site: {missing}"
