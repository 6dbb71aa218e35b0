"""The installed package is complete: a wheel built from the project holds every module (components
included, found without a hand-written package list), the schema and the templates, and works on its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

IMPORT_EVERY_MODULE = """
import importlib, pathlib, sys
import autocnnp
top = pathlib.Path(autocnnp.__file__).parent
assert str(top).startswith(sys.argv[1]), f"autocnnp comes from {top}, not the wheel"
names = sorted(".".join(p.relative_to(top.parent).with_suffix("").parts).removesuffix(".__init__")
               for p in top.rglob("*.py") if p.name != "__main__.py")
for name in names:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:  # the tensorflow framework's modules, where `make tensorflow` was not run
        if exc.name != "tensorflow":
            raise
from autocnnp.generator.points import POINTS
assert all(p.registry.names() for p in POINTS), [p.type for p in POINTS if not p.registry.names()]
print(len(names))
"""


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_runs_alone(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.rst"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "autocnnp", source / "autocnnp", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--no-index", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("autocnnp-*.whl"))
    files = set(zipfile.ZipFile(wheel).namelist())
    in_tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "autocnnp").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert in_tree <= files, f"missing from the wheel: {sorted(in_tree - files)}"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", IMPORT_EVERY_MODULE, str(site)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout) == sum(1 for p in in_tree if p.endswith(".py") and not p.endswith("__main__.py"))
    validate = subprocess.run([sys.executable, "-m", "autocnnp", "validate", str(ROOT / "xml_configs" / "demo.xml")],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert validate.returncode == 0 and "valid" in validate.stdout, validate.stderr

    # adding a component is one file: dropped into its point's folder, a job names it and its parameters
    (site / "autocnnp" / "components" / "lr_policies" / "halving.py").write_text(HALVING)
    command = [sys.executable, "-m", "autocnnp", "plan", str(ROOT / "xml_configs" / "demo.xml"), "--set",
               "lr_policy=halving", "--set", "lr_policy.every=3"]
    plan = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0 and "lr_policy [extensible] = halving  (built-in)" in plan.stdout, plan.stderr
    assert "every=3" in plan.stdout
    bad = subprocess.run(command[:-1] + ["lr_policy.every=0"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "every is 0, it must be at least 1" in bad.stderr


HALVING = '''"""Learning-rate policy: the base lr, halved every few epochs."""
from dataclasses import dataclass

from autocnnp.core.settings import setting
from autocnnp.generator.protocols import LRPolicy
from autocnnp.generator.registry import component


@dataclass
class Config:
    every: int = setting(2, min=1, help="epochs between two halvings")


@component("halving")
class Halving(LRPolicy):
    """The base lr halved every ``every`` epochs."""

    def rate(self, t):
        return self.base_lr * 0.5 ** (t // self.steps_per_epoch // self.config.every)
'''
