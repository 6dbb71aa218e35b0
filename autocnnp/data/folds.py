"""k-fold cross-validation splits by case (``<data> folds``, ``autocnnp study``).

:func:`assign_folds` deals the cases into ``k`` folds, stratified by the set of classes each case holds:
cases with the same classes are shuffled (``seed``) and dealt round-robin, the deal going on from group to
group, so every fold gets its share of each kind of case and the folds differ in size by at most one.
A study writes the split once into its run tree (:func:`write_split`, ``OUTPUT/folds.json``) with a
fingerprint of the data; every fold reads it back (:func:`read_split`), which refuses it when the cases
or their files changed since.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np

from ..core.errors import DataError
from ..core.files import atomic_write, read_json
from .index import read_dataset
from .volumes import load_labels

SPLIT_FORMAT = 1


def assign_folds(classes: dict[str, tuple[int, ...]], k: int, seed: int) -> dict[str, int]:
    """case name -> fold (0..k-1), stratified by the classes each case holds (see the module docstring)."""
    if k < 2 or len(classes) < k:
        raise ValueError(f"{len(classes)} case(s) cannot be split into {k} folds (each fold needs a case)")
    groups: dict[tuple[int, ...], list[str]] = {}
    for name in sorted(classes):
        groups.setdefault(tuple(sorted(classes[name])), []).append(name)
    rng = random.Random(seed)
    out, turn = {}, 0
    for key in sorted(groups):
        names = groups[key]
        rng.shuffle(names)
        for name in names:
            out[name] = turn % k
            turn += 1
    return out


def case_classes(root: Path) -> dict[str, tuple[int, ...]]:
    """The label values each labelled training case of dataset ``root`` holds (cases without labels: none)."""
    out = {}
    for case in read_dataset(root).cases("training"):
        if case.label is None:
            out[case.name] = ()
            continue
        out[case.name] = tuple(int(v) for v in np.unique(load_labels(case.label)[0]))
    return out


def fingerprint(root: Path) -> str:
    """A digest of the training cases of ``root``: their names and their files' sizes."""
    digest = hashlib.sha256()
    for case in read_dataset(root).cases("training"):
        digest.update(case.name.encode())
        for path in (case.image, case.label):
            digest.update(f"|{path.name}:{path.stat().st_size}".encode() if path is not None else b"|-")
    return digest.hexdigest()[:16]


def make_split(root: Path, k: int, seed: int) -> dict:
    """The split record of dataset ``root``: k, seed, the data's fingerprint and every case's fold."""
    try:
        folds = assign_folds(case_classes(root), k, seed)
    except ValueError as exc:
        raise DataError(root, str(exc), "lower folds, or add cases") from None
    return {"autocnnp_split": SPLIT_FORMAT, "data": str(Path(root).resolve()), "folds": k, "seed": seed,
            "fingerprint": fingerprint(root), "cases": folds}


def write_split(path: Path, root: Path, k: int, seed: int) -> dict:
    """The split in ``path``: written there once (atomically); a split already there is read back and checked."""
    if path.is_file():
        return read_split(path, root, k, seed)
    split = make_split(root, k, seed)
    atomic_write(path, json.dumps(split, indent=1) + "\n")
    return split


def read_split(path: Path, root: Path, k: int, seed: int) -> dict:
    """The split in ``path``, refused when it was made for other folds or data that has changed since."""
    split = read_json(path)
    if not isinstance(split, dict) or split.get("autocnnp_split") != SPLIT_FORMAT:
        raise DataError(path, "is not a k-fold split written by autocnnp", "remove it; autocnnp study writes it again")
    if (split.get("folds"), split.get("seed")) != (k, seed):
        raise DataError(path, f"the split has {split.get('folds')} folds (seed {split.get('seed')}), the job asks for "
                        f"{k} (seed {seed})", "give the study its own output folder, or remove the split file")
    if split.get("fingerprint") != fingerprint(root):
        raise DataError(path, f"the training cases of {root} changed since the split was written (other cases or "
                        "files of other sizes)", "restore the data, or start the study again in a new output folder")
    return split


def fold_cases(split: dict, names: list[str], fold: int) -> tuple[list[str], list[str]]:
    """The training and validation cases of ``fold`` among ``names``, in their order."""
    cases = split["cases"]
    return [n for n in names if cases.get(n) != fold], [n for n in names if cases.get(n) == fold]
