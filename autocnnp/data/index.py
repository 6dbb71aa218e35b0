"""Dataset indexes: which cases a Medical Segmentation Decathlon style dataset holds.

A dataset is named by one of

* a folder holding ``dataset.json`` (the Decathlon layout: ``training`` entries
  ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``, ``test`` a list of image
  paths, relative paths resolved against the folder);
* the ``dataset.json`` file itself;
* a ``.csv`` file whose first line is a header naming the columns ``image`` and (optionally)
  ``label``; each further line is one case, paths relative to the CSV's folder; an empty label cell
  makes a test case.

Every problem is a :class:`~autocnnp.core.errors.DataError` naming the file, the problem and a hint.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import DataError, JobError
from ..core.files import read_input

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_REQUIRED_KEYS = ("name", "modality", "labels", "numTraining", "training")
_SPLITS = ("training", "test", "all")
INDEX_LIMIT = 64 << 20  # bytes of a dataset.json or CSV index


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


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def case_name(path: Path) -> str:
    """The case a file belongs to: its name without ``.nii.gz`` / ``.nii``."""
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, ".gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def nifti_files(folder: Path) -> dict[str, Path]:
    """``{case name: file}`` of the NIfTI files in ``folder`` (not recursive)."""
    out: dict[str, Path] = {}
    for p in sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p)):
        name = case_name(p)
        if name in out:
            raise DataError(p, f"two files in the folder are case {name!r} ({out[name].name} and {p.name})",
                            "keep one file per case")
        out[name] = p
    return out


def is_dataset(path: Path) -> bool:
    """A Decathlon folder (holding dataset.json), a dataset.json-style file or a CSV index."""
    if path.is_dir():
        return (path / "dataset.json").is_file()
    return path.is_file() and path.suffix.lower() in (".json", ".csv")


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


def _index_text(index_file: Path, missing_hint: str) -> str:
    """The index's text, read as a bounded regular file (a folder, FIFO or device is refused, never read)."""
    if not index_file.exists():
        raise DataError(index_file, "dataset index file does not exist", missing_hint)
    try:
        data = read_input(index_file, index_file, "dataset index", limit=INDEX_LIMIT, hint="check the file's permissions")
    except JobError as exc:
        raise DataError(index_file, exc.problem, exc.hint) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(index_file, f"the dataset index is not UTF-8 text ({exc.reason} at byte {exc.start})",
                        "save it as UTF-8") from None


def _read_json_index(index_file: Path) -> DatasetIndex:
    base = index_file.parent
    text = _index_text(index_file, "point to a Decathlon folder holding dataset.json, or to a CSV of image,label pairs")
    try:
        data = json.loads(text)
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
        training.append(Case(case_name(image), image, _resolve(base, entry["label"])))

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
        test.append(Case(case_name(image), image, None))

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
    text = _index_text(index_file, "check the path of the CSV file")
    try:
        rows = [row for row in csv.reader(io.StringIO(text, newline="")) if row and any(cell.strip() for cell in row)]
    except csv.Error as exc:
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
            training.append(Case(case_name(image), image, _resolve(base, label_text)))
        else:
            test.append(Case(case_name(image), image, None))
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
