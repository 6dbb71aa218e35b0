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
