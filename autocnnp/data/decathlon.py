"""Reading, loading and validating Medical Segmentation Decathlon style datasets.

A dataset is named by one of

* a folder holding ``dataset.json`` (the Decathlon layout: ``training`` entries
  ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``, ``test`` a list of image
  paths, relative paths resolved against the folder);
* the ``dataset.json`` file itself;
* a ``.csv`` file whose first line is a header naming the columns ``image`` and (optionally)
  ``label``; each further line is one case, paths relative to the CSV's folder; an empty label cell
  makes a test case.

Images are returned channels last ``(X, Y, Z, C)`` (3D images get ``C = 1``). Every problem is a
:class:`~autocnnp.data.errors.DataError` naming the file, the problem and a hint.
:func:`validate_dataset` checks the whole dataset one case at a time, streaming the voxel data so
that no volume is held in memory. This module does not import torch.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autocnnp.data.errors import DataError

AFFINE_ATOL = 1e-3
_CHUNK = 1 << 20
_REQUIRED_KEYS = ("name", "modality", "labels", "numTraining", "training")
_SPLITS = ("training", "test", "all")


@dataclass(frozen=True)
class Case:
    """One case of a dataset: its image file and its label file (``None`` for a test case)."""

    name: str
    image: Path
    label: Path | None = None

    @property
    def labelled(self) -> bool:
        return self.label is not None


@dataclass
class DatasetIndex:
    """What a ``dataset.json`` (or CSV) says about a dataset.

    ``modalities`` and ``labels`` map channel / label values to names; both are empty for a CSV
    index. ``problems`` lists consistency problems that do not stop reading (e.g. ``numTraining``
    disagreeing with the entries); :func:`validate_dataset` reports them.
    """

    root: Path
    index_file: Path
    name: str
    modalities: dict[int, str]
    labels: dict[int, str]
    training: list[Case]
    test: list[Case]
    problems: list[DataError] = field(default_factory=list)

    def cases(self, split: str = "training") -> list[Case]:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
        if split == "training":
            return list(self.training)
        if split == "test":
            return list(self.test)
        return list(self.training) + list(self.test)

    def modality_index(self, which) -> int:
        """Channel index of a modality given as an index or a name (case-insensitive)."""
        if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
            return int(which)
        text = str(which).strip()
        if text.lstrip("-").isdigit():
            return int(text)
        for idx, name in self.modalities.items():
            if name.lower() == text.lower():
                return idx
        known = ", ".join(f"{i}={n}" for i, n in sorted(self.modalities.items())) or "none declared"
        raise DataError(
            self.index_file,
            f"modality {which!r} is not declared (modalities: {known})",
            "name a declared modality or give its channel index",
        )


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".gz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _resolve(base: Path, text: str) -> Path:
    p = Path(text)
    return p if p.is_absolute() else (base / p)


def _int_keyed(mapping, what: str, index_file: Path, problems: list[DataError]) -> dict[int, str]:
    out: dict[int, str] = {}
    if not isinstance(mapping, dict):
        problems.append(DataError(index_file, f"'{what}' must be an object mapping numbers to names",
                                  f'write e.g. "{what}": {{"0": "background"}}'))
        return out
    for key, value in mapping.items():
        try:
            out[int(key)] = str(value)
        except (TypeError, ValueError):
            problems.append(DataError(index_file, f"'{what}' key {key!r} is not an integer",
                                      f"use integer keys such as \"0\", \"1\" in '{what}'"))
    return dict(sorted(out.items()))


def _read_json_index(index_file: Path) -> DatasetIndex:
    base = index_file.parent
    try:
        data = json.loads(index_file.read_text())
    except FileNotFoundError:
        raise DataError(index_file, "dataset index file does not exist",
                        "point to a Decathlon folder holding dataset.json, or to a CSV of image,label pairs") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(index_file, f"cannot read the dataset index ({exc})", "check the file's permissions") from None
    except json.JSONDecodeError as exc:
        raise DataError(index_file, f"is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                        "fix the JSON syntax, e.g. a trailing comma or a missing quote") from None
    if not isinstance(data, dict):
        raise DataError(index_file, "the top level of dataset.json must be an object", "see the Decathlon dataset.json format")

    problems: list[DataError] = []
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if "training" in missing:
        raise DataError(index_file, "dataset.json has no 'training' list",
                        'add "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]')
    if missing:
        problems.append(DataError(index_file, f"dataset.json is missing the key(s) {', '.join(missing)}",
                                  "add them as in the Decathlon format (name, modality, labels, numTraining, training)"))
    modalities = _int_keyed(data.get("modality", {}), "modality", index_file, problems)
    labels = _int_keyed(data.get("labels", {}), "labels", index_file, problems)
    if labels and sorted(labels) != list(range(len(labels))):
        problems.append(DataError(index_file, f"'labels' keys {sorted(labels)} are not 0..{len(labels) - 1}",
                                  "number the labels 0 (background), 1, 2, ... without gaps"))
    if modalities and sorted(modalities) != list(range(len(modalities))):
        problems.append(DataError(index_file, f"'modality' keys {sorted(modalities)} are not 0..{len(modalities) - 1}",
                                  "number the modalities by channel index 0, 1, 2, ..."))

    entries = data["training"]
    if not isinstance(entries, list):
        raise DataError(index_file, "'training' must be a list of {\"image\", \"label\"} objects",
                        "see the Decathlon dataset.json format")
    training: list[Case] = []
    for n, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("image"), str) and isinstance(entry.get("label"), str)):
            raise DataError(index_file, f"training entry {n} ({entry!r}) is not an object with string 'image' and 'label'",
                            'write each entry as {"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}')
        image = _resolve(base, entry["image"])
        training.append(Case(_case_name(image), image, _resolve(base, entry["label"])))

    test_entries = data.get("test", [])
    if not isinstance(test_entries, list):
        raise DataError(index_file, "'test' must be a list of image paths", 'write "test": ["./imagesTs/x.nii.gz", ...]')
    test: list[Case] = []
    for n, entry in enumerate(test_entries):
        if isinstance(entry, dict) and isinstance(entry.get("image"), str):
            entry = entry["image"]
        if not isinstance(entry, str):
            raise DataError(index_file, f"test entry {n} ({entry!r}) is not an image path",
                            'write "test": ["./imagesTs/x.nii.gz", ...]')
        image = _resolve(base, entry)
        test.append(Case(_case_name(image), image, None))

    for key, listed in (("numTraining", training), ("numTest", test)):
        if key not in data:
            continue
        declared = data[key]
        if not isinstance(declared, int) or declared != len(listed):
            problems.append(DataError(index_file, f"'{key}' is {declared!r} but {len(listed)} "
                                      f"{'training' if key == 'numTraining' else 'test'} entries are listed",
                                      f"set '{key}' to {len(listed)} or list the missing cases"))
    seen: dict[Path, int] = {}
    for case in training + test:
        seen[case.image] = seen.get(case.image, 0) + 1
    for image, count in seen.items():
        if count > 1:
            problems.append(DataError(index_file, f"image {image} is listed {count} times",
                                      "list every case once (duplicates leak between training and validation)"))
    return DatasetIndex(base, index_file, str(data.get("name", base.name)), modalities, labels, training, test, problems)


def _read_csv_index(index_file: Path) -> DatasetIndex:
    base = index_file.parent
    try:
        with open(index_file, newline="") as fh:
            rows = [row for row in csv.reader(fh) if row and any(cell.strip() for cell in row)]
    except FileNotFoundError:
        raise DataError(index_file, "dataset index file does not exist", "check the path of the CSV file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(index_file, f"cannot read the CSV index ({exc})", "write a plain-text CSV of image,label pairs") from None
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    if "image" not in header:
        raise DataError(index_file, "the first line must be a header naming the columns 'image' and 'label'",
                        "add the line 'image,label' at the top of the CSV")
    ci = header.index("image")
    cl = header.index("label") if "label" in header else None
    training: list[Case] = []
    test: list[Case] = []
    for line, row in enumerate(rows[1:], start=2):
        cells = [cell.strip() for cell in row]
        if ci >= len(cells) or not cells[ci]:
            raise DataError(index_file, f"line {line} has no image path", "give one image,label pair per line")
        image = _resolve(base, cells[ci])
        label_text = cells[cl] if cl is not None and cl < len(cells) else ""
        if label_text:
            training.append(Case(_case_name(image), image, _resolve(base, label_text)))
        else:
            test.append(Case(_case_name(image), image, None))
    return DatasetIndex(base, index_file, index_file.stem, {}, {}, training, test, [])


def read_dataset(root) -> DatasetIndex:
    """Read a dataset index (folder with ``dataset.json``, the JSON file itself, or a CSV file)."""
    path = Path(root)
    if path.is_dir():
        path = path / "dataset.json"
        if not path.exists():
            raise DataError(path, "dataset folder has no dataset.json",
                            "point to a Decathlon task folder (holding dataset.json) or to a CSV file of image,label pairs")
    elif not path.exists():
        raise DataError(path, "dataset path does not exist",
                        "point to a Decathlon task folder (holding dataset.json) or to a CSV file of image,label pairs")
    if path.suffix.lower() == ".csv":
        return _read_csv_index(path)
    return _read_json_index(path)


def read_dataset_index(root, split: str = "training") -> list[Case]:
    """The cases of a dataset; ``split`` is ``"training"`` (labelled, default), ``"test"`` or ``"all"``.

    Test cases have ``label=None``.
    """
    return read_dataset(root).cases(split)


# --------------------------------------------------------------------------------------------
# Loading

def _open_nifti(path: Path):
    import nibabel as nib

    if not path.exists():
        raise DataError(path, "file does not exist", "fix the path in the dataset index or restore the file")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for garbage / truncated headers
        raise DataError(path, f"is not a readable NIfTI image ({type(exc).__name__}: {exc})",
                        "re-download or re-export the file; it may be corrupt or truncated") from None


def _read_array(path: Path, img) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except Exception as exc:
        raise DataError(path, f"voxel data cannot be read ({type(exc).__name__}: {exc})",
                        "re-download or re-export the file; it is probably truncated or corrupt") from None


def _channels_last(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape ``(X, Y, Z, C)`` of an image with NIfTI shape ``shape``, or a DataError."""
    if len(shape) == 3:
        return tuple(shape) + (1,)
    if len(shape) == 4:
        return tuple(shape)
    if len(shape) == 5 and shape[3] == 1:
        return tuple(shape[:3]) + (shape[4],)
    raise DataError(path, f"image has shape {tuple(shape)}, expected 3D (X, Y, Z) or 4D (X, Y, Z, C)",
                    "export one volume per case, modalities along the 4th axis")


def _label_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise DataError(path, f"label has shape {tuple(shape)}, expected 3D (X, Y, Z)",
                        "store one integer label map per case")
    return shape


def load_case(case: Case):
    """Load one case: ``(image, label, affine, header)``.

    ``image`` is float32 ``(X, Y, Z, C)`` (channels last; 3D images get ``C = 1``), ``label`` an
    int32 ``(X, Y, Z)`` array or ``None`` for a test case, ``affine`` the image's 4x4 affine and
    ``header`` the image's NIfTI header. Raises :class:`DataError` for a missing, corrupt or
    truncated file, a label of another spatial shape, or non-integer label values.
    """
    image_path = Path(case.image)
    img = _open_nifti(image_path)
    shape = _channels_last(image_path, img.shape)
    try:
        data = img.get_fdata(dtype=np.float32, caching="unchanged")
    except Exception as exc:
        raise DataError(image_path, f"voxel data cannot be read ({type(exc).__name__}: {exc})",
                        "re-download or re-export the file; it is probably truncated or corrupt") from None
    image = np.ascontiguousarray(data.reshape(shape), dtype=np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)
    header = img.header

    label = None
    if case.label is not None:
        label_path = Path(case.label)
        lab = _open_nifti(label_path)
        lshape = _label_shape(label_path, lab.shape)
        if lshape != shape[:3]:
            raise DataError(label_path, f"label shape {lshape} does not match image shape {shape[:3]} of {image_path}",
                            "pair each image with the label map drawn on it")
        raw = _read_array(label_path, lab).reshape(lshape)
        if raw.dtype.kind == "f":
            rounded = np.rint(raw)
            if not np.array_equal(rounded, raw, equal_nan=False):
                raise DataError(label_path, "label map holds non-integer (or NaN) values",
                                "store labels as integers, not resampled with linear interpolation")
            raw = rounded
        label = raw.astype(np.int32)
    return image, label, affine, header


# --------------------------------------------------------------------------------------------
# Validation

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
        arr = _read_array(path, img)
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


def _check_case(case: Case, allowed: set[int] | None, n_modalities: int | None, index_file: Path) -> list[DataError]:
    errors: list[DataError] = []
    image_path = Path(case.image)
    try:
        img = _open_nifti(image_path)
        shape = _channels_last(image_path, img.shape)
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
        lab = _open_nifti(label_path)
        lshape = _label_shape(label_path, lab.shape)
        if img is not None:
            if lshape != shape[:3]:
                errors.append(DataError(label_path, f"label shape {lshape} does not match image shape {shape[:3]} "
                                        f"of {image_path}", "pair each image with the label map drawn on it"))
            elif not np.allclose(lab.affine, img.affine, atol=AFFINE_ATOL):
                errors.append(DataError(label_path, f"label affine differs from the affine of {image_path} "
                                        f"(max difference {np.abs(lab.affine - img.affine).max():.4g})",
                                        "resample the label onto the image grid or fix its header"))
        values, finite, integer = _scan_voxels(label_path, lab, want_values=True)
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


def validate_dataset(root, num_classes: int | None = None) -> list[DataError]:
    """Check a whole dataset and return every problem found (an empty list means it is usable).

    Checks the index (missing keys, ``numTraining``/``numTest`` against the entries, label and
    modality numbering, duplicates, ``num_classes`` against the declared labels) and then every
    case, one at a time with streamed voxel data: files exist and are readable NIfTI (corrupt or
    truncated files are caught), channel count against the declared modalities, finite image
    values, image/label spatial shape and affine (``np.allclose``, atol 1e-3) agreement, integer
    label values within the declared labels (and ``< num_classes`` when given).
    """
    try:
        ds = read_dataset(root)
    except DataError as exc:
        return [exc]
    errors = list(ds.problems)
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
    for case in ds.cases("all"):
        errors.extend(_check_case(case, allowed, n_mod, ds.index_file))
    return errors
