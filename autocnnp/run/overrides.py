"""Command-line values for ``<cluster>`` properties (launcher side only), applied as job overrides:
typed and checked exactly as if written in the job, errors naming the option that gave them."""

from __future__ import annotations

from pathlib import Path

from ..engine.overrides import apply_overrides
from ..generator.assemble import Generator, assemble


def with_cluster(gen: Generator, values: dict[str, object], flags: dict[str, str] | None = None) -> Generator:
    """``gen`` re-assembled with the given ``<cluster>`` properties replacing the job's (None: keep);
    ``flags`` names the command-line option of a property where it is not ``--the-name``."""
    texts, labels = {}, {}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, Path):
            text = str(value.expanduser().resolve())  # relative to where the command runs, not the job
        else:
            text = str(value)
        key = f"cluster.{name}"
        texts[key] = text
        labels[key] = f"{gen.job.file} (command line {(flags or {}).get(name, '--' + name.replace('_', '-'))})"
    return assemble(apply_overrides(gen.job, texts, labels, record=False)) if texts else gen
