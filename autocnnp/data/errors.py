"""One error type for bad input data: ``path: problem. Hint: fix.`` on one paragraph."""

from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """A data file (or dataset index) that cannot be used.

    ``str(error)`` is a single paragraph naming the file, the problem and a hint on how to fix it,
    e.g. ``/data/Task01/labelsTr/case_003.nii.gz: label values {7} are not declared in
    dataset.json (allowed: 0, 1, 2, 3). Hint: fix the label file or add the label to dataset.json.``
    """

    exit_code = 2

    def __init__(self, path: Path | str | None, problem: str, hint: str = ""):
        self.path = Path(path) if path is not None else None
        self.problem = " ".join(str(problem).split()).rstrip(".")
        self.hint = " ".join(str(hint).split()).rstrip(".")
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        text = f"{where}{self.problem}."
        return f"{text} Hint: {self.hint}." if self.hint else text

    def __reduce__(self):  # keep picklable across processes (multiprocessing, DataLoader workers)
        return (type(self), (self.path, self.problem, self.hint))
