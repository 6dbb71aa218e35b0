"""Deploy / update a job (and optionally autocnnp itself) to a shared folder, keyed by content.

The thesis deploys the CNN-Parallelism-Generator to every node over a shared filesystem before
training. ``autocnnp deploy JOB.xml --to DIR`` copies the job file and every file it names (plug-ins,
architecture files, the hostfile: each ``<path>`` outside ``<data>`` and ``<output>``) into::

    DIR/objects/ab/abcdef...        one read-only copy per distinct content (sha256)
    DIR/jobs/<job>-<key>/...        the job tree, hard links to the objects, relative layout kept; the
                                    key (from the job file's absolute path) keeps two jobs of the same
                                    name apart
    DIR/jobs/<job>-<key>/.deploy.json  its manifest: relative path -> sha256
    DIR/lib/autocnnp/...            with --with-package: the autocnnp package (manifest DIR/lib/.deploy.json)

Deploying again is the update: files whose content is unchanged are neither copied nor relinked,
content already in DIR/objects (another job, an earlier version) is only linked, and files the
job no longer names are removed from its tree (never its outputs). ``--dry-run`` prints the same
report and writes nothing. Datasets are not deployed: the job reads them where it says.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import JobError
from ..core.files import atomic_create, read_json, sha256_file, sha256_text, write_json
from ..engine.xmlparse import read_xml
from .job import Job, load_job

MANIFEST = ".deploy.json"
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".tmp")


@dataclass(frozen=True)
class Item:
    source: Path
    rel: str  # path inside the deployed tree
    sha: str
    size: int


def _item(source: Path, rel: str) -> Item:
    return Item(source, rel, sha256_file(source), source.stat().st_size)


def job_files(job: Job) -> tuple[list[Path], list[Path]]:
    """(files to deploy, those of them named by an absolute path): the job file and every file it names
    in a ``<path>`` outside ``<data>`` and ``<output>``, and the hostfile."""
    (root, _), base = read_xml(job.spec.file), job.spec.base_dir
    files, absolute = [job.spec.file], []
    for el in root.iter("path"):
        if any(a.tag in ("data", "output") for a in el.iterancestors()):
            continue
        text = (el.text or "").strip()
        path = Path(text).expanduser()
        full = path if path.is_absolute() else (base / path).resolve()
        if full.is_file() and full not in files:
            files.append(full)
            if path.is_absolute():
                absolute.append(full)
    hostfile = job.launch.hostfile
    if hostfile is not None and hostfile.resolve() not in files:
        files.append(hostfile.resolve())
    return files, absolute


def job_items(job: Job) -> tuple[list[Item], list[Path]]:
    files, absolute = job_files(job)
    root = Path(os.path.commonpath([f.parent for f in files]))
    return [_item(f, f.relative_to(root).as_posix()) for f in files], absolute


def package_items() -> list[Item]:
    """The autocnnp package as it is installed (built-in components and templates included)."""
    top = Path(__file__).resolve().parents[1]
    items = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            if not name.endswith(SKIP_SUFFIXES):
                path = Path(dirpath) / name
                items.append(_item(path, f"autocnnp/{path.relative_to(top).as_posix()}"))
    return items


def job_tree(store: Path, job_file: Path) -> Path:
    """Where a job is deployed in ``store``: one folder per job file (by its absolute path), so that
    /a/job.xml and /b/job.xml never replace each other's files."""
    path = Path(job_file).resolve()
    return store / "jobs" / f"{path.stem}-{sha256_text(str(path))[:8]}"


def _object(store: Path, sha: str) -> Path:
    return store / "objects" / sha[:2] / sha


def _read_manifest(tree: Path) -> dict[str, str]:
    return (read_json(tree / MANIFEST) or {}).get("files", {})


def _same(target: Path, obj: Path, sha: str, old: dict[str, str], rel: str) -> bool:
    """Is the deployed file already this content? (the object's hard link, or the manifest's hash
    with an unchanged size)."""
    try:
        st = target.stat()
    except OSError:
        return False
    try:
        if os.path.samefile(target, obj):
            return True
    except OSError:
        pass
    return old.get(rel) == sha and obj.exists() and st.st_size == obj.stat().st_size


def _place(obj: Path, target: Path) -> None:
    """Put the object at target: a hard link where the filesystem allows, else a copy."""

    def link(tmp: Path) -> None:
        try:
            os.link(obj, tmp)
        except OSError:
            shutil.copy2(obj, tmp)

    atomic_create(target, link)


def _store(source: Path, obj: Path) -> None:
    def copy(tmp: Path) -> None:
        shutil.copyfile(source, tmp)
        if sha256_file(tmp) != obj.name:  # changed while we copied: do not store it under the wrong key
            raise OSError(f"{source} changed while it was copied; deploy again")
        os.chmod(tmp, 0o444)  # objects are shared by every job that has this content: never edit them

    atomic_create(obj, copy)


def sync(items: list[Item], store: Path, tree: Path, dry_run: bool, out=None) -> dict[str, int]:
    """Bring ``tree`` to ``items`` through the object store; print one line per file."""
    out = out or sys.stdout
    old = _read_manifest(tree)
    counts = {"copy": 0, "link": 0, "same": 0, "remove": 0, "bytes": 0}
    verb = "would " if dry_run else ""
    for item in items:
        obj, target = _object(store, item.sha), tree / item.rel
        if _same(target, obj, item.sha, old, item.rel):
            counts["same"] += 1
            continue
        action = "link" if obj.exists() else "copy"
        counts[action] += 1
        if action == "copy":
            counts["bytes"] += item.size
        print(f"  {verb}{action:<6} {item.rel}" + (f" ({item.size} bytes)" if action == "copy" else
                                                   " (content already deployed)"), file=out)
        if not dry_run:
            if action == "copy":
                _store(item.source, obj)
            _place(obj, target)
    wanted = {i.rel for i in items}
    for rel in sorted(set(old) - wanted):
        counts["remove"] += 1
        print(f"  {verb}remove {rel} (no longer part of the deployment)", file=out)
        if not dry_run:
            (tree / rel).unlink(missing_ok=True)
    if not dry_run:
        write_json(tree / MANIFEST, {"files": {i.rel: i.sha for i in sorted(items, key=lambda i: i.rel)}})
    return counts


def _summary(what: str, counts: dict[str, int], dry_run: bool) -> str:
    return (f"{what}: {counts['copy']} {'to copy' if dry_run else 'copied'} ({counts['bytes']} bytes), "
            f"{counts['link']} {'to link' if dry_run else 'linked'} (content already there), "
            f"{counts['same']} unchanged, {counts['remove']} {'to remove' if dry_run else 'removed'}")


def deploy(job_file: Path | str, to: Path | None, with_package: bool = False, dry_run: bool = False,
           out=None) -> Path:
    """Deploy (or update) the job to ``to``; returns the deployed job file's path."""
    out = out or sys.stdout
    job = load_job(job_file)
    target = to or job.deploy.deploy_dir
    if target is None:
        raise JobError(job.spec.where, "no folder to deploy to", "pass --to DIR or set <property name=\"deploy_dir\"> "
                       "in <cluster>")
    store = Path(target).expanduser().resolve()
    if store.exists() and not store.is_dir():
        raise JobError(job.spec.where, f"deploy target {store} is not a folder", "pass a folder to --to")
    if not dry_run:
        try:
            store.mkdir(parents=True, exist_ok=True)
            probe = store / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise JobError(job.spec.where, f"cannot write to deploy target {store}: {exc.strerror or exc}",
                           "pick a folder you can write to (on the filesystem every node mounts)") from None
    items, absolute = job_items(job)
    tree = job_tree(store, job.spec.file)
    print(f"{'dry run: ' if dry_run else ''}deploying {job.spec.file} to {tree}", file=out)
    counts = sync(items, store, tree, dry_run, out)
    print(_summary("job", counts, dry_run), file=out)
    for path in absolute:
        print(f"  note: the job names {path} by an absolute path; the deployed job still reads it there", file=out)
    deployed_job = tree / next(i.rel for i in items if i.source == job.spec.file)
    if with_package:
        lib = store / "lib"
        print(f"{'dry run: ' if dry_run else ''}deploying the autocnnp package to {lib}", file=out)
        print(_summary("package", sync(package_items(), store, lib, dry_run, out), dry_run), file=out)
        print(f"run it on any node: PYTHONPATH={lib} {sys.executable} -m autocnnp run {deployed_job}", file=out)
    else:
        print(f"run it on any node: autocnnp run {deployed_job}", file=out)
    return deployed_job
