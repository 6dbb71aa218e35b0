"""Shared fixtures for the engine and CLI tests: write a job file, find a line, run the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "xml_configs" / "demo.xml"
TEMPLATE = ROOT / "templates" / "job.xml"
PLUGINS = Path(__file__).resolve().parent / "plugins"


def line_of(path: Path, needle: str) -> int:
    """1-based line of the first ``needle`` outside comments in ``path`` (the offending element)."""
    text = re.sub(r"<!--.*?-->", lambda m: re.sub(r"[^\n]", " ", m.group()), path.read_text(), flags=re.S)
    assert needle in text, needle
    return text[: text.index(needle)].count("\n") + 1


@pytest.fixture
def job(tmp_path):
    """``job((old, new), ..., name=, text=)``: the demo job (or ``text``) with edits, written in tmp_path."""

    def make(*edits: tuple[str, str], name: str = "job.xml", text: str | None = None) -> Path:
        text = DEMO.read_text() if text is None else text
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
