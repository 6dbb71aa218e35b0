"""Files that are never seen half-written, content hashes and an inter-process lock.

Every file autocnnp writes that someone may read concurrently or after a crash (checkpoints,
manifests, metrics, records, stamps) goes through :func:`atomic_write`: a temporary file in the same
folder, flushed and fsynced, renamed over the target, the folder fsynced. Whatever point a crash
hits, the target is either the old complete file or the new complete file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import BinaryIO, cast

from .errors import JobError, Location, shorten

TEMP_SUFFIX = ".tmp"
INPUT_LIMIT = 1 << 20  # bytes of a job file, a hostfile or a user's Python file
REFUSED_WRITES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # the filesystem is full, over quota or read-only


def size_text(n: float) -> str:
    """Bytes for a person: ``40 KiB``, ``3.0 MiB``."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit in ("bytes", "KiB") else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def mount_of(path: Path | str) -> Path:
    """The mount point of the filesystem that holds (or would hold) ``path``."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def free_bytes(path: Path | str) -> int:
    """Bytes an unprivileged write may still use on the filesystem of ``path``."""
    st = os.statvfs(mount_of(path))
    return st.f_bavail * st.f_frsize


def space_text(path: Path | str) -> str:
    """``40 KiB free of 3.0 MiB on /mnt``: the free space of the filesystem of ``path``."""
    mount = mount_of(path)
    try:
        st = os.statvfs(mount)
    except OSError:
        return f"free space of {mount} unknown"
    return f"{size_text(st.f_bavail * st.f_frsize)} free of {size_text(st.f_blocks * st.f_frsize)} on {mount}"


class WriteRefused(OSError):
    """A write the filesystem refused (full, over quota, read-only), on one line naming the file and the
    free space: ``cannot write /out/metrics.csv: No space left on device (40 KiB free of 3.0 MiB on /out)``."""

    def __init__(self, path: Path | str, code: int):
        super().__init__(code, os.strerror(code), str(path))

    def __str__(self) -> str:
        return f"cannot write {shorten(self.filename)}: {self.strerror} ({space_text(self.filename)})"

    def __reduce__(self):
        return (type(self), (self.filename, self.errno))


def refused_write(exc: BaseException | None) -> OSError | None:
    """The refused write (an OSError of REFUSED_WRITES) that ``exc`` is or came from, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in REFUSED_WRITES:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def writing(path: Path | str):
    """A write in the block that the filesystem refuses becomes a :class:`WriteRefused` naming ``path``."""
    try:
        yield
    except WriteRefused:
        raise
    except Exception as exc:
        refused = refused_write(exc)
        if refused is None or refused.errno is None:  # (a refused write has its errno)
            raise
        raise WriteRefused(path, refused.errno) from None


class _Watched:
    """A file whose write errors are kept: some writers (torch.save) replace an ENOSPC by their own error."""

    def __init__(self, file: BinaryIO):
        self._file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self._file, name)


def temp_path(path: Path) -> Path:
    """A unique temporary name next to ``path`` (``.NAME.<pid>.<token>.tmp``)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}{TEMP_SUFFIX}")


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where folders cannot be opened)."""
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


def first_missing(path: Path | str) -> Path | None:
    """The outermost of ``path`` and its folders that does not exist (what creating ``path`` creates), or None."""
    path = Path(path).absolute()
    return next((p for p in (*reversed(path.parents), path) if not p.exists()), None)


def atomic_create(path: Path | str, create: Callable[[Path], object]) -> Path:
    """Have ``create(tmp)`` make the file at a temporary name next to ``path`` (a copy, a hard link), then
    rename it over ``path`` atomically. The folder is created if needed. On any error the temporary file
    is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = temp_path(path)
    with writing(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            create(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fsync_dir(path.parent)
    return path


def atomic_write(path: Path | str, content: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Write ``content`` (bytes, text, or a function writing to a binary file) to ``path`` atomically
    (:func:`atomic_create`), flushed to disk before the rename."""

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as f:
            if callable(content):
                watched = _Watched(f)
                try:
                    content(cast(BinaryIO, watched))  # it passes every other attribute on to the file
                except Exception:
                    if watched.error is not None:
                        raise watched.error from None
                    raise
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())

    return atomic_create(path, write)


def reserve(path: Path | str) -> None:
    """Allocate the blocks of the (sparse) file ``path`` now: a filesystem without room refuses here
    (:class:`WriteRefused`), not with a SIGBUS when a memory map writes into a hole later."""
    with writing(path):
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as exc:
            if exc.errno in REFUSED_WRITES:  # else a filesystem that cannot allocate ahead: the map's writes tell
                raise
        finally:
            os.close(fd)


def append_text(path: Path | str, text: str) -> None:
    """Append ``text`` to ``path`` (a file one process writes) whole or not at all: a refused write
    (:class:`WriteRefused`) cuts the file back to what it held, so a reader never meets half a line."""
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            size, left = os.fstat(fd).st_size, memoryview(text.encode())
            try:
                while left:
                    left = left[os.write(fd, left):]
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def jsonable(value):
    """``value`` with dataclasses, paths and other objects turned into JSON types."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json(path: Path | str, data) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    return atomic_write(path, json.dumps(jsonable(data), indent=2) + "\n")


def read_json(path: Path | str) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def sha256_text(text: str) -> str:
    import hashlib  # here: with OpenSSL's bindings it costs `autocnnp validate` ~3 ms

    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path | str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_input(path: Path, where: Location | Path, what: str, limit: int = INPUT_LIMIT,
               hint: str = "check the path") -> bytes:
    """The bytes of a file the user named (a job file, a hostfile, user code): a regular file of at most
    ``limit`` bytes. Anything else is a JobError at ``where``: never a folder, FIFO or device (a read
    could block or never end), nor a size trusted from ``stat``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        reason = {errno.ELOOP: "its path loops through symbolic links",
                  errno.ENAMETOOLONG: "its path is too long"}.get(exc.errno or 0, exc.strerror or str(exc))
        raise JobError(where, f"cannot read the {what} {shorten(path)} ({reason})", hint) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            raise JobError(where, f"the {what} {shorten(path)} is {kind}, not a file", f"name the {what} itself")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise JobError(where, f"the {what} {shorten(path)} is over the {limit}-byte limit",
                       f"a {what} is small text; keep data and models in the files it points at")
    return data


@contextmanager
def exclusive_lock(lock_path: Path):
    """Hold an exclusive ``flock`` on ``lock_path`` (created, with its folder, if missing) for the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
