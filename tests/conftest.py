"""Shared fixtures for the engine and CLI tests: write a job file, find a line, run the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "xml_configs" / "demo.xml"
TEMPLATE = ROOT / "autocnnp" / "templates" / "job.xml"
PLUGINS = Path(__file__).resolve().parent / "plugins"

# A fixed job for the tests to edit (the shipped demo and template are tuned by others). Comments included:
# the reported line numbers must count them.
BASE_JOB = """<?xml version="1.0" encoding="UTF-8"?>
<!-- A test job in the shape of thesis Listing 4.1.
     Comments mention <CNN_archi>, <parallelism-degree> and dist_strategy: line_of() skips them. -->
<system_config>
  <task name="imaging_segmentation">
    <parallelism-degree>2</parallelism-degree>
    <seed>0</seed>
    <output><path>runs/demo</path></output>
    <CNN_archi name="unet">
      <param name="depth">3</param>
      <param name="base_channels">16</param>
    </CNN_archi>
    <CNN-Parallelism-Generator>
      <module name="train_env_def">
        <action class="non_extensible" type="device_placement"><value>local_rank</value></action>
        <action class="non_extensible" type="memory_allocation"><value>soft_placement</value></action>
      </module>
      <module name="train_strategy_def">
        <action class="extensible" type="dist_strategy"><value>ring_allreduce</value></action>
        <action class="extensible" type="lr_policy">
          <value>gradual_warmup</value>
          <value name="warmup_epochs">1</value>
        </action>
        <action class="extensible" type="checkpoint">
          <value>periodic</value>
          <value name="every_epochs">1</value>
        </action>
      </module>
    </CNN-Parallelism-Generator>
    <data format="synthetic">
      <param name="kind">brain</param>
      <param name="train_samples">32</param>
      <param name="valid_samples">8</param>
      <param name="size">32</param>
    </data>
    <hyperparameters>
      <property name="lr">0.01</property>
      <property name="optimiser">SGD</property>
      <property name="loss">dice_ce</property>
      <property name="minibatch_size">4</property>
      <property name="start_epoch">0</property>
      <property name="end_epoch">3</property>
    </hyperparameters>
  </task>
</system_config>
"""


def line_of(path: Path, needle: str) -> int:
    """1-based line of the first ``needle`` outside comments in ``path`` (the offending element)."""
    text = re.sub(r"<!--.*?-->", lambda m: re.sub(r"[^\n]", " ", m.group()), path.read_text(), flags=re.S)
    assert needle in text, needle
    return text[: text.index(needle)].count("\n") + 1


@pytest.fixture
def job(tmp_path):
    """``job((old, new), ..., name=, text=)``: BASE_JOB (or ``text``) with edits, written in tmp_path."""

    def make(*edits: tuple[str, str], name: str = "job.xml", text: str | None = None) -> Path:
        text = BASE_JOB if text is None else text
        for old, new in edits:
            assert old in text, f"edit target not in job: {old!r}"
            text = text.replace(old, new, 1)
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return make


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``autocnnp.cli.main``: returns (exit code, stdout, stderr). No launcher variables leak in."""
    for name in ("OMPI_COMM_WORLD_RANK", "RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)

    def run(*argv) -> tuple[int, str, str]:
        from autocnnp.cli import main

        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


# What a test starts decides its marker (pyproject.toml lists them; `make test-fast` deselects them all).
MARKED_COMMANDS = {"mpirun": "ranks", "srun": "ranks", "horovodrun": "ranks", "sbatch": "slurm", "scancel": "slurm",
                   "docker": "docker", "dockerd": "docker", "ip": "multihost"}
AUTOCNNP_RANK_COMMANDS = ("run", "tune", "study")  # `python -m autocnnp run|tune|study ...` starts ranks


def _needed_marker(argv) -> str | None:
    words = [str(a) for a in (argv if isinstance(argv, (list, tuple)) else [argv])]
    if not words:
        return None
    program = Path(words[0]).name
    if program == "on" and len(words) > 2:  # cluster/netns/on HOST COMMAND...: a command on a namespace host
        return "multihost" if _needed_marker(words[2:]) is None else _needed_marker(words[2:])
    if program in MARKED_COMMANDS:
        return MARKED_COMMANDS[program]
    if "-m" in words and words[words.index("-m") + 1:words.index("-m") + 2] == ["autocnnp"]:
        rest = words[words.index("-m") + 2:]
        return "ranks" if rest and rest[0] in AUTOCNNP_RANK_COMMANDS else None
    if "-m" in words and words[words.index("-m") + 1:words.index("-m") + 2] == ["autocnnp.run.worker"]:
        return "ranks"
    return None


@pytest.fixture(autouse=True)
def markers_match_what_the_test_starts(request, monkeypatch):
    """Fail a test that starts ranks, Slurm jobs, Docker or network namespaces without the marker that says so
    (subprocesses started from this process: directly, or through the CLI called in process)."""
    import subprocess

    marked = {m.name for m in request.node.iter_markers()}
    real_init = subprocess.Popen.__init__

    def checked(self, args, *rest, **kw):
        needed = _needed_marker(args)
        if needed and needed not in marked:
            pytest.fail(f"{request.node.nodeid} starts {Path(str(args[0] if isinstance(args, (list, tuple)) else args)).name}"
                        f" ({' '.join(map(str, args))[:120]}): mark it @pytest.mark.{needed}")
        real_init(self, args, *rest, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", checked)


@pytest.fixture
def nothing_starts(monkeypatch):
    """Fail if run & manage gets as far as starting the ranks."""
    from autocnnp.run import launch

    def no_start(*args, **kwargs):
        raise AssertionError("a refused job must start nothing")

    monkeypatch.setattr(launch, "supervise", no_start)
