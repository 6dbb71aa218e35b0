"""Checking a dataset before training: every file readable, shapes, affines, finite values, labels.

:func:`validate_dataset` checks the whole dataset one case at a time, streaming the voxel data so that
no volume is held in memory; :func:`validate_once` stamps the verdict so that the ranks of a job, and
later runs on unchanged files, do not check again. This module does not import torch.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import DataError
from ..core.files import atomic_write, exclusive_lock
from .index import Case, read_dataset
from .spacing import file_geometry
from .volumes import image_shape, label_shape, open_nifti, read_array

AFFINE_ATOL = 1e-3
_CHUNK = 1 << 20


def _scan_voxels(path: Path, img, *, want_values: bool) -> tuple[set | None, bool, bool]:
    """Stream a NIfTI file's voxel data in chunks without holding the volume.

    Returns ``(values, all_finite, all_integer)``; ``values`` is the set of distinct values when
    ``want_values``. Raises DataError when the data is truncated or the compression is corrupt.
    """
    proxy = img.dataobj
    try:  # nibabel's ArrayProxy knows where the voxels start (the in-memory header may say 0)
        offset = int(proxy.offset)
        dtype = np.dtype(proxy.dtype)
        shape = tuple(proxy.shape)
        slope, inter = float(proxy.slope), float(proxy.inter)
        if str(getattr(proxy, "file_like", "")) != str(path):
            raise ValueError("not a single-file image")
    except Exception:  # not a single-file NIfTI: fall back to reading the array
        arr = read_array(path, img)
        values = set(np.unique(arr).tolist()) if want_values else None
        return values, bool(np.isfinite(arr).all()), bool(np.array_equal(np.rint(arr), arr))

    scaled = not np.isnan(slope) and (slope != 1 or inter != 0)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    values: set | None = set() if want_values else None
    finite = True
    integer = True
    got = 0
    try:
        with opener(path, "rb") as fh:
            skip = offset
            while skip > 0:
                part = fh.read(min(_CHUNK, skip))
                if not part:
                    break
                skip -= len(part)
            rest = b""
            while got < nbytes:
                chunk = fh.read(min(_CHUNK, nbytes - got))
                if not chunk:
                    break
                got += len(chunk)
                buf = rest + chunk
                usable = len(buf) - len(buf) % dtype.itemsize
                rest = buf[usable:]
                arr = np.frombuffer(buf[:usable], dtype=dtype)
                if scaled:
                    arr = arr * slope + inter
                if arr.dtype.kind in "fc":
                    finite = finite and bool(np.isfinite(arr).all())
                    integer = integer and bool(np.array_equal(np.rint(arr), arr))
                if values is not None:
                    values.update(np.unique(arr).tolist())
            while fh.read(_CHUNK):  # read to the end so gzip checks its CRC and length
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(path, f"voxel data cannot be read ({type(exc).__name__}: {exc})",
                        "re-download or re-export the file; it is probably truncated or corrupt") from None
    if got < nbytes or skip > 0:
        raise DataError(path, f"file is truncated: the header promises {nbytes} bytes of voxel data, found {got}",
                        "re-download or re-export the file")
    return values, finite, integer


def _fmt_values(values) -> str:
    return ", ".join(str(int(v)) if float(v).is_integer() else repr(v) for v in sorted(values))


@dataclass
class Verdict:
    """What checking a dataset found: problems (each stops a job) and notes that do not."""

    problems: list[DataError] = field(default_factory=list)
    empty_labels: list[str] = field(default_factory=list)  # cases whose label map is background only

    def note(self) -> str | None:
        """One line about the empty label maps, if any."""
        if not self.empty_labels:
            return None
        shown = ", ".join(self.empty_labels[:5]) + (" ..." if len(self.empty_labels) > 5 else "")
        return (f"{len(self.empty_labels)} case(s) have a label map with background only ({shown}): they train "
                "on background, and their slices are spread over the whole volume")


def _check_case(case: Case, allowed: set[int] | None, n_modalities: int | None, index_file: Path,
                verdict: Verdict, spacing: bool = False) -> list[DataError]:
    errors: list[DataError] = []
    image_path = Path(case.image)
    try:
        img = open_nifti(image_path)
        shape = file_geometry(image_path, img)[0] if spacing else image_shape(image_path, img.shape)
        if n_modalities and shape[3] != n_modalities:
            errors.append(DataError(image_path, f"image has {shape[3]} channel(s) but {index_file.name} declares "
                                    f"{n_modalities} modalities", "fix the 'modality' entry or the image"))
        _, finite, _ = _scan_voxels(image_path, img, want_values=False)
        if not finite:
            errors.append(DataError(image_path, "image holds NaN or infinite values",
                                    "replace them (e.g. with 0) before training"))
    except DataError as exc:
        errors.append(exc)
        img = None

    if case.label is None:
        return errors
    label_path = Path(case.label)
    try:
        lab = open_nifti(label_path)
        lshape = label_shape(label_path, lab.shape)
        if img is not None:
            if lshape != shape[:3]:
                errors.append(DataError(label_path, f"label shape {lshape} does not match image shape {shape[:3]} "
                                        f"of {image_path}", "pair each image with the label map drawn on it"))
            elif not np.allclose(lab.affine, img.affine, atol=AFFINE_ATOL):
                errors.append(DataError(label_path, f"label affine differs from the affine of {image_path} "
                                        f"(max difference {np.abs(lab.affine - img.affine).max():.4g})",
                                        "resample the label onto the image grid or fix its header"))
        values, finite, integer = _scan_voxels(label_path, lab, want_values=True)
        if values is not None and not any(values):
            verdict.empty_labels.append(case.name)
        if not finite or not integer:
            errors.append(DataError(label_path, "label map holds non-integer, NaN or infinite values",
                                    "store labels as integers, not resampled with linear interpolation"))
        elif allowed is not None:
            bad = {v for v in values if int(v) not in allowed}
            if bad:
                errors.append(DataError(label_path, f"label values {{{_fmt_values(bad)}}} are outside the declared "
                                        f"labels ({_fmt_values(allowed)})",
                                        f"fix the label file or declare the label in {index_file.name} / num_classes"))
    except DataError as exc:
        errors.append(exc)
    return errors


def validate_dataset(root, num_classes: int | None = None, split: str = "all") -> list[DataError]:
    """Every problem of the dataset (an empty list means it is usable): :func:`check_dataset`'s problems."""
    return check_dataset(root, num_classes, split).problems


def check_dataset(root, num_classes: int | None = None, split: str = "all", *, spacing: bool = False) -> Verdict:
    """Check a dataset's index and the cases of ``split`` (``training``, ``test`` or ``all``).

    Checks the index (missing keys, ``numTraining``/``numTest`` against the entries, label and
    modality numbering, duplicates, ``num_classes`` against the declared labels) and then every
    case, one at a time with streamed voxel data: files exist and are readable NIfTI (corrupt or
    truncated files are caught), channel count against the declared modalities, finite image
    values, image/label spatial shape and affine (``np.allclose``, atol 1e-3) agreement, integer
    label values within the declared labels (and ``< num_classes`` when given), and with ``spacing`` (3D
    training resamples by it) positive, finite header voxel spacings; label maps with background only are
    noted, not refused.
    """
    verdict = Verdict()
    try:
        ds = read_dataset(root)
    except DataError as exc:
        verdict.problems.append(exc)
        return verdict
    errors = verdict.problems
    errors.extend(ds.problems)
    allowed: set[int] | None = set(ds.labels) if ds.labels else None
    if num_classes is not None:
        if ds.labels and len(ds.labels) != int(num_classes):
            errors.append(DataError(ds.index_file, f"the job asks for {num_classes} classes but {len(ds.labels)} labels "
                                    f"are declared ({_fmt_values(ds.labels)})",
                                    "make num_classes equal to the number of labels, background included"))
        upto = set(range(int(num_classes)))
        allowed = upto if allowed is None else allowed & upto
    if not ds.training:
        errors.append(DataError(ds.index_file, "the dataset lists no labelled training cases",
                                "add image,label pairs to the index"))
    n_mod = len(ds.modalities) or None
    for case in ds.cases(split):
        errors.extend(_check_case(case, allowed, n_mod, ds.index_file, verdict, spacing))
    return verdict


def problems_error(problems: list[DataError], root, *, limit: int = 3) -> DataError:
    """One DataError for a list of problems: the problem itself when alone, else the first ``limit``."""
    if len(problems) == 1:  # a fresh copy: no traceback of where validation first met it
        return DataError(problems[0].path, problems[0].problem, problems[0].hint)
    shown = problems[:limit]
    listed = " ".join(f"({i}) {p}" for i, p in enumerate(shown, start=1))
    more = f" ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return DataError(root, f"the dataset has {len(problems)} problems: {listed}{more}",
                     f"fix the files named above; `autocnnp check-data {root}` lists every problem")


def _stat(path: Path) -> list:
    try:
        st = Path(path).stat()
        return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(path), None, None]


def _files_key(root) -> str:
    """A key that changes whenever the dataset index or any file it names changes."""
    try:
        ds = read_dataset(root)
    except DataError as exc:
        return "unreadable:" + str(exc)
    files = [_stat(ds.index_file)]
    for case in ds.cases("all"):
        files.append(_stat(case.image))
        if case.label is not None:
            files.append(_stat(case.label))
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


_STAMP_FORMAT = 2


def validate_once(root, state_dir: Path, role: str = "train", check=None, key: str | None = None) -> Verdict:
    """Check the training cases of ``root`` (:func:`check_dataset`; the test images do not stop a job), or
    run ``check()`` keyed by ``key`` (e.g. a slice cache's check), unless an earlier run stamped the same
    files; raise on problems, else return the verdict.

    Concurrent callers (the ranks of a job) serialise on a lock in ``state_dir``: the first one
    validates and writes the verdict (``validated-<role>-<hash of root>.json``), the others read it.
    """
    state_dir = Path(state_dir)
    where = str(Path(root).resolve())
    stamp = state_dir / f"validated-{role}-{hashlib.sha256(where.encode()).hexdigest()[:12]}.json"
    key = key or _files_key(root)
    with exclusive_lock(state_dir / ".validate.lock"):
        try:
            saved = json.loads(stamp.read_text())
        except (OSError, ValueError):
            saved = None
        if (isinstance(saved, dict) and saved.get("format") == _STAMP_FORMAT and saved.get("key") == key
                and saved.get("root") == where):
            verdict = Verdict([DataError(*p) for p in saved.get("problems", [])], list(saved.get("empty_labels", [])))
        else:
            verdict = check() if check is not None else check_dataset(root, split="training")
            record = {"format": _STAMP_FORMAT, "key": key, "root": where, "empty_labels": verdict.empty_labels,
                      "problems": [[None if p.path is None else str(p.path), p.problem, p.hint]
                                   for p in verdict.problems]}
            atomic_write(stamp, json.dumps(record))
    if verdict.problems:
        raise problems_error(verdict.problems, root)
    return verdict
