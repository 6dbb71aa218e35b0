"""Crash-safe periodic checkpoints with user plug-ins (the ``checkpoint`` extension point).

Layout of the checkpoint folder (only rank 0 writes; every rank may read)::

    ckpt-epoch0003.pt      complete checkpoints (only ever created by an atomic rename)
    ckpt-epoch0004.pt
    latest                 one line: the file name of the newest complete checkpoint
    .ckpt-epoch0005.pt.<pid>.<token>.tmp   a save in progress (or left by a crash: ignored)

A save writes a temp file in the same folder, flushes and fsyncs it, renames it over its final
name, fsyncs the folder, then replaces ``latest`` the same way and finally deletes the oldest
checkpoints beyond ``keep``. Whatever point a crash hits, the previous ``latest`` checkpoint is
still complete and loadable.

Plug-ins are the user code the job plugs into this extensible action (thesis Listing 4.1:
``<value name="LRSchedule"><path>ckpt1.py</path></value>``). A plug-in is what the user's file
defines under that name: a class (instantiated with no arguments), an object, or a function.
Optional hooks: ``on_epoch_end(epoch, metrics, state)`` (a plain function is called with the same
arguments), ``state_dict()`` and ``load_state_dict(d)``. ``state`` is the trainer's object with at
least ``optimizer`` and ``lr_scale`` (a multiplier the plug-in may change; the trainer applies it
on top of the learning-rate policy).
"""

from __future__ import annotations

import inspect
import os
import re
import secrets
import warnings
from pathlib import Path

POINTER = "latest"
_CKPT = re.compile(r"^ckpt-epoch(\d{4,})\.pt$")
_TEMP = re.compile(r"^\.(ckpt-epoch\d{4,}\.pt|latest)\..+\.tmp$")


def checkpoint_name(epoch: int) -> str:
    return f"ckpt-epoch{epoch:04d}.pt"


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_path(directory: Path, final_name: str) -> Path:
    return directory / f".{final_name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _write_atomic(path: Path, write) -> None:
    """Write ``path`` via a temp file in the same folder: write, flush, fsync, rename, fsync folder.

    On any error the temp file is removed and ``path`` is left as it was.
    """
    tmp = _temp_path(path.parent, path.name)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


class Periodic:
    """Save every ``every_epochs`` epochs and at the last one, keep the newest ``keep``, resume."""

    def __init__(self, *, directory: Path, rank: int, plugins: dict[str, object] | None = None,
                 every_epochs: int = 1, keep: int = 2, resume: bool = True):
        for name, value, low in (("every_epochs", every_epochs, 1), ("keep", keep, 1), ("rank", rank, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number of at least {low}, not {value!r}")
        if not isinstance(resume, bool):
            raise ValueError(f"resume must be true or false, not {resume!r}")
        self.directory = Path(directory)
        self.rank = rank
        self.every_epochs = every_epochs
        self.keep = keep
        self.resume = resume
        self.plugins = {name: _instantiate(name, value) for name, value in (plugins or {}).items()}

    # -- when --------------------------------------------------------------------------------

    def due(self, epoch: int, last_epoch: int) -> bool:
        """Whether to save after epoch ``epoch`` (0-based index of the epoch just finished).

        True after every ``every_epochs`` completed epochs (epochs every-1, 2*every-1, ...) and
        always after ``last_epoch`` (the index of the final epoch, i.e. total_epochs - 1).
        """
        return epoch >= last_epoch or (epoch + 1) % self.every_epochs == 0

    # -- save --------------------------------------------------------------------------------

    def save(self, state: dict, epoch: int) -> Path | None:
        """Write ``state`` as the checkpoint of ``epoch``; rank 0 only (other ranks return None)."""
        if self.rank != 0:
            return None
        import torch

        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a whole number of at least 0, not {epoch!r}")
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / checkpoint_name(epoch)
        _write_atomic(path, lambda f: torch.save(state, f))
        _write_atomic(self.directory / POINTER, lambda f: f.write((path.name + "\n").encode()))
        self._rotate(keep_also=path)
        self._remove_stray_temps()
        return path

    def _complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoint files, oldest epoch first."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _CKPT.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def _rotate(self, keep_also: Path) -> None:
        others = [p for _, p in self._complete() if p != keep_also]
        doomed = others[:max(len(others) - (self.keep - 1), 0)]
        for p in doomed:
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def _remove_stray_temps(self) -> None:
        """Temp files left by a crashed save (a single writer, rank 0, so none is in use now)."""
        for p in self.directory.iterdir():
            if _TEMP.match(p.name):
                try:
                    p.unlink()
                except OSError:
                    pass

    # -- find and load -----------------------------------------------------------------------

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the one ``latest`` names, else the highest epoch on disk."""
        pointer = self.directory / POINTER
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if _CKPT.match(name):
            target = self.directory / name
            if target.is_file():
                return target
        complete = self._complete()
        return complete[-1][1] if complete else None

    def load(self, path: Path | None = None) -> dict | None:
        """The saved state (tensors on CPU), or None when there is none or ``resume`` is off.

        Without ``path``, a checkpoint that cannot be read falls back to the next older one.
        """
        if not self.resume:
            return None
        import torch

        if path is not None:
            return torch.load(Path(path), map_location="cpu", weights_only=False)
        first = self.latest()
        if first is None:
            return None
        candidates = [first] + [p for _, p in reversed(self._complete()) if p != first]
        errors = []
        for candidate in candidates:
            try:
                state = torch.load(candidate, map_location="cpu", weights_only=False)
            except FileNotFoundError as exc:  # rotated away by rank 0 while we were looking
                errors.append((candidate, exc))
                continue
            except Exception as exc:  # noqa: BLE001 - a damaged file: try the previous one
                errors.append((candidate, exc))
                warnings.warn(f"checkpoint {candidate} cannot be read ({type(exc).__name__}: {exc}); "
                              "trying an older one", RuntimeWarning, stacklevel=2)
                continue
            return state
        candidate, exc = errors[0]
        raise RuntimeError(f"no checkpoint in {self.directory} can be read; first failure: {candidate}: "
                           f"{type(exc).__name__}: {exc}") from exc

    # -- plug-ins ----------------------------------------------------------------------------

    def callbacks_on_epoch_end(self, epoch: int, metrics: dict, state) -> None:
        """Run every plug-in's ``on_epoch_end(epoch, metrics, state)`` in the job's order.

        Call it on every rank with the same (all-reduced) metrics so the ranks stay in step.
        """
        for name, plugin in self.plugins.items():
            hook = _hook(plugin)
            if hook is None:
                continue
            try:
                hook(epoch, metrics, state)
            except Exception as exc:
                exc.add_note(f"in checkpoint plug-in '{name}' (on_epoch_end, epoch {epoch})")
                raise

    def plugin_state(self) -> dict:
        """``{plug-in name: state_dict()}`` for the plug-ins that have one."""
        out = {}
        for name, plugin in self.plugins.items():
            method = getattr(plugin, "state_dict", None)
            if callable(method):
                out[name] = method()
        return out

    def load_plugin_state(self, d: dict | None) -> None:
        """Give each plug-in its saved state back (unknown names are reported and skipped)."""
        for name, sd in (d or {}).items():
            plugin = self.plugins.get(name)
            method = getattr(plugin, "load_state_dict", None) if plugin is not None else None
            if callable(method):
                method(sd)
            else:
                warnings.warn(f"checkpoint holds state for plug-in '{name}', which is not plugged in now or "
                              "has no load_state_dict(); its state is ignored", RuntimeWarning, stacklevel=2)

    def describe(self) -> str:
        plugs = f", plug-ins: {', '.join(self.plugins)}" if self.plugins else ""
        return (f"checkpoint every {self.every_epochs} epoch(s) and at the last one into {self.directory}, "
                f"keep {self.keep}, resume {'on' if self.resume else 'off'}{plugs}")


def _instantiate(name: str, value):
    """A class becomes an instance (no arguments); objects and functions are used as they are."""
    if inspect.isclass(value):
        try:
            return value()
        except TypeError as exc:
            raise TypeError(f"checkpoint plug-in '{name}': class {value.__name__} must be constructible "
                            f"with no arguments ({exc})") from None
    if not callable(value) and not any(hasattr(value, h) for h in ("on_epoch_end", "state_dict",
                                                                    "load_state_dict")):
        raise TypeError(f"checkpoint plug-in '{name}' is a {type(value).__name__}: define a class, an object "
                        "with on_epoch_end(epoch, metrics, state), or a function (epoch, metrics, state)")
    return value


def _hook(plugin):
    method = getattr(plugin, "on_epoch_end", None)
    if callable(method):
        return method
    if callable(plugin) and not inspect.isclass(plugin):
        return plugin
    return None
