"""One error type for every bad job: ``file:line:column: problem. Hint: fix.`` on one paragraph."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Location:
    """Where something was written in a job file."""

    file: Path
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Source(Location):
    """A place that is not a line of the job file: a command-line option, a Slurm job, ..."""

    text: str = ""

    def __str__(self) -> str:
        return self.text


class JobError(Exception):
    """A job file the engine refuses. Its text is one paragraph with location, problem and hint."""

    exit_code = 2

    def __init__(self, where: Location | Path | str, problem: str, hint: str = ""):
        self.where = where if isinstance(where, Location) else Location(Path(where))
        self.problem = problem.rstrip(".")
        self.hint = hint.rstrip(".")
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.where}: {self.problem}."
        end = "" if self.hint.endswith("?") else "."
        return f"{text} Hint: {self.hint}{end}" if self.hint else text


def did_you_mean(word: str, choices) -> str:
    """A hint naming the closest valid choice(s), or listing them all when nothing is close."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word.lower(), [c.lower() for c in choices], n=2, cutoff=0.6)
    by_lower = {c.lower(): c for c in choices}
    if close:
        return "did you mean " + " or ".join(f"'{by_lower[c]}'" for c in close) + "?"
    return "valid choices are " + ", ".join(f"'{c}'" for c in choices)
