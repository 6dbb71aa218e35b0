"""The errors a user sees and the exit codes of every command.

A bad job file is a :class:`JobError`, bad data a :class:`DataError`: both print as one paragraph
naming the place, the problem and the fix (``file:line:col: problem. Hint: fix.``) and end the
command with :attr:`ExitCode.BAD_INPUT`.
"""

from __future__ import annotations

import difflib
import signal
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """What ``autocnnp run``, ``submit``, ``deploy``, ``tune`` and ``status`` return."""

    OK = 0  # success
    FAILED = 1  # a rank failed, hung or was killed, or the launcher did; a write the filesystem refused
    BAD_INPUT = 2  # the job, its data or an option was refused; nothing ran
    DIVERGED = 3  # training stopped because the loss diverged (a result, not a crash)
    STOPPED = 75  # stopped on request at an epoch's end with a checkpoint (Slurm's time-limit warning)
    TIMED_OUT = 124  # status --wait: the Slurm job is still queued or running after --timeout (as timeout(1))
    INTERRUPTED = 128  # + the signal's number: 130 SIGINT (Ctrl-C), 143 SIGTERM, 129 SIGHUP


class Interrupted(BaseException):
    """The command was stopped by a signal; ``detail`` says what it stopped (one line, no traceback). A
    BaseException, as KeyboardInterrupt is: no ``except Exception`` (a file check reporting an unreadable
    file, say) may take it for a failure and carry on."""

    def __init__(self, signum: int, detail: str = ""):
        self.signum, self.detail = signum, detail
        super().__init__(str(self))

    @property
    def exit_code(self) -> int:
        return ExitCode.INTERRUPTED + self.signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}" + (f": {self.detail}" if self.detail else "")


def shorten(path: Path | str, limit: int = 200) -> str:
    """A path for a message: whole when reasonable, else its start and end around '...'."""
    text = str(path)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}"


@dataclass(frozen=True)
class Location:
    """Where something was written in a job file."""

    file: Path
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        return f"{shorten(self.file)}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Source(Location):
    """A place that is not a line of the job file: a command-line option, a Slurm job, ..."""

    text: str = ""

    def __str__(self) -> str:
        return self.text


def _sentence(text: str) -> str:
    return " ".join(str(text).split()).rstrip(".")


class JobError(Exception):
    """A job file (or an option) the engine refuses: location, problem and hint on one paragraph."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, where: Location | Path | str, problem: str, hint: str = ""):
        self.where = where if isinstance(where, Location) else Location(Path(where))
        self.problem = _sentence(problem)  # one paragraph: whatever a library's message held
        self.hint = _sentence(hint)
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.where}: {self.problem}."
        end = "" if self.hint.endswith("?") else "."
        return f"{text} Hint: {self.hint}{end}" if self.hint else text


class DataError(Exception):
    """A data file (or dataset index) that cannot be used, e.g. ``/data/labelsTr/case_003.nii.gz: label
    values {7} are outside the declared labels (0, 1, 2, 3). Hint: fix the label file.``"""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, path: Path | str | None, problem: str, hint: str = ""):
        self.path = Path(path) if path is not None else None
        self.problem = _sentence(problem)
        self.hint = _sentence(hint)
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        text = f"{where}{self.problem}."
        return f"{text} Hint: {self.hint}." if self.hint else text

    def __reduce__(self):  # picklable across processes (DataLoader workers)
        return (type(self), (self.path, self.problem, self.hint))


def did_you_mean(word: str, choices) -> str:
    """A hint naming the closest valid choice(s), or listing them all when nothing is close."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word.lower(), [c.lower() for c in choices], n=2, cutoff=0.6)
    by_lower = {c.lower(): c for c in choices}
    if close:
        return "did you mean " + " or ".join(f"'{by_lower[c]}'" for c in close) + "?"
    return "valid choices are " + ", ".join(f"'{c}'" for c in choices)
