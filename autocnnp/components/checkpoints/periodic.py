"""Crash-safe periodic checkpoints with user plug-ins (the ``checkpoint`` extension point).

Layout of the checkpoint folder (only rank 0 writes; every rank may read)::

    ckpt-epoch0003.pt      complete checkpoints (only ever created by an atomic rename)
    ckpt-epoch0004.pt
    latest                 one line: the file name of the newest complete checkpoint
    ckpt-best.pt           the checkpoint of the best epoch by ``best_metric`` (``autocnnp predict
    best                     --checkpoint best``); ``best`` records its metric, value and epoch
    .ckpt-epoch0005.pt.<pid>.<token>.tmp   a save in progress (or left by a crash: ignored)

A save writes the checkpoint atomically (core/files.py), then replaces ``latest`` the same way and
finally deletes the oldest checkpoints beyond ``keep``. Whatever point a crash hits, the previous
``latest`` checkpoint is still complete and loadable.

Plug-ins are the user code the job plugs into this extensible action (thesis Listing 4.1:
``<value name="LRSchedule"><path>ckpt1.py</path></value>``), run by the Checkpointer protocol.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from autocnnp.core.errors import DataError, did_you_mean
from autocnnp.core.files import TEMP_SUFFIX, atomic_write, read_json, write_json
from autocnnp.core.rundir import BEST_CHECKPOINT, BEST_RECORD, LATEST_POINTER
from autocnnp.core.settings import setting
from autocnnp.generator.protocols import Checkpointer
from autocnnp.generator.registry import component

_CKPT = re.compile(r"^ckpt-epoch(\d{4,})\.pt$")


@dataclass
class Config:
    every_epochs: int = setting(1, min=1, aliases=("every", "period", "frequency"),
                                help="save after every this many epochs (and always after the last)")
    keep: int = setting(2, min=1, aliases=("keep_last", "max_to_keep"), help="complete checkpoints kept")
    resume: bool = setting(True, help="continue from the newest checkpoint of the output folder")
    best_metric: str = setting("dice_fg", help="keep checkpoints/ckpt-best.pt of the epoch with the highest value "
                                               "of this metric (a *loss: the lowest); empty: keep no best")


def checkpoint_name(epochs_done: int) -> str:
    return f"ckpt-epoch{epochs_done:04d}.pt"


@component("periodic", frameworks=("torch", "tensorflow"))
class Periodic(Checkpointer):
    """Atomic checkpoints every N epochs and at the end, keep the newest, resume, with user plug-ins."""

    # -- when --------------------------------------------------------------------------------

    def due(self, epoch: int, last_epoch: int) -> bool:
        """Whether to save after epoch ``epoch`` (0-based index of the epoch just finished): after every
        ``every_epochs`` completed epochs and always after ``last_epoch``."""
        return epoch >= last_epoch or (epoch + 1) % self.config.every_epochs == 0

    # -- save --------------------------------------------------------------------------------

    def save(self, state: dict, epoch: int) -> Path | None:
        """Write ``state`` as the checkpoint after ``epoch`` (0-based), named by the epochs done, as metrics.csv
        and the console count them; rank 0 only (other ranks return None)."""
        if self.rank != 0:
            return None
        path = self.directory / checkpoint_name(epoch + 1)
        atomic_write(path, lambda f: torch.save(state, f))
        atomic_write(self.directory / LATEST_POINTER, path.name + "\n")
        self._rotate(keep_also=path)
        for p in self.directory.iterdir():  # temp files a crashed save left (a single writer: none in use)
            if p.name.endswith(TEMP_SUFFIX) and p.name.startswith("."):
                p.unlink(missing_ok=True)
        return path

    def _complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoint files, oldest epoch first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _CKPT.match(p.name)) and p.is_file()]
        return sorted(found)

    def _rotate(self, keep_also: Path) -> None:
        others = [p for _, p in self._complete() if p != keep_also]
        for p in others[:max(len(others) - (self.config.keep - 1), 0)]:
            p.unlink(missing_ok=True)

    # -- the best epoch --------------------------------------------------------------------------

    def _best_record(self) -> dict | None:
        record = read_json(self.directory / BEST_RECORD)
        return record if isinstance(record, dict) and record.get("metric") == self.config.best_metric else None

    def check_metrics(self, reported: set[str]) -> None:
        name = self.config.best_metric
        if name and name not in reported:
            raise DataError(None, f"checkpoint best_metric '{name}' is not a metric this run reports",
                            did_you_mean(name, reported))

    def is_best(self, metrics: dict) -> bool:
        """Whether ``metrics[best_metric]`` beats the recorded best (a loss by being lower); rank 0, which
        writes it, decides."""
        name = self.config.best_metric
        value = metrics.get(name)
        if self.rank != 0 or not name or value is None or value != value:  # not ours, no best kept, or NaN
            return False
        record = self._best_record()
        return record is None or (value < record["value"] if name.endswith("loss") else value > record["value"])

    def save_best(self, state: dict, epoch: int, metrics: dict) -> Path | None:
        """Write ``state`` as ``ckpt-best.pt`` and record why (rank 0 only)."""
        if self.rank != 0:
            return None
        path = self.directory / BEST_CHECKPOINT
        atomic_write(path, lambda f: torch.save(state, f))
        write_json(self.directory / BEST_RECORD, {"file": BEST_CHECKPOINT, "metric": self.config.best_metric,
                                                  "value": metrics[self.config.best_metric], "epoch": epoch + 1})
        return path

    def best(self) -> Path | None:
        path = self.directory / BEST_CHECKPOINT
        return path if path.is_file() else None

    # -- find and load -----------------------------------------------------------------------

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the one ``latest`` names, else the highest epoch on disk."""
        try:
            name = (self.directory / LATEST_POINTER).read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if _CKPT.match(name) and (self.directory / name).is_file():
            return self.directory / name
        complete = self._complete()
        return complete[-1][1] if complete else None

    def load(self) -> dict | None:
        """The saved state (tensors on CPU), or None when there is none or ``resume`` is off. A checkpoint
        that cannot be read falls back to the next older one."""
        if not self.config.resume:
            return None
        first = self.latest()
        if first is None:
            return None
        errors = []
        for candidate in [first] + [p for _, p in reversed(self._complete()) if p != first]:
            try:
                return torch.load(candidate, map_location="cpu", weights_only=False)
            except FileNotFoundError as exc:  # rotated away by rank 0 while we were looking
                errors.append((candidate, exc))
            except Exception as exc:  # noqa: BLE001 - a damaged file: try the previous one
                errors.append((candidate, exc))
                warnings.warn(f"checkpoint {candidate} cannot be read ({type(exc).__name__}: {exc}); "
                              "trying an older one", RuntimeWarning, stacklevel=2)
        candidate, exc = errors[0]
        raise RuntimeError(f"no checkpoint in {self.directory} can be read; first failure: {candidate}: "
                           f"{type(exc).__name__}: {exc}") from exc

    def describe(self) -> str:
        plugs = f", plug-ins: {', '.join(self.plugins)}" if self.plugins else ""
        return (f"checkpoint every {self.config.every_epochs} epoch(s) and at the last one into {self.directory}, "
                f"keep {self.config.keep}, resume {'on' if self.config.resume else 'off'}{plugs}")
