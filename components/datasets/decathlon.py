"""``<data format="decathlon">``: NIfTI volumes (Decathlon layout or a CSV index) as cached 2D slices.

What :func:`build` does, on every rank (all steps are safe to run concurrently):

1. **Validate** the training (and validation) dataset with
   :func:`~autocnnp.data.decathlon.validate_dataset` -- every file readable, shapes, affines,
   labels -- and raise a :class:`~autocnnp.data.errors.DataError` naming the first problems, so a
   bad file stops the job before any rank trains. One rank validates while the others wait on a
   lock; the verdict is stamped (keyed by the files' paths, sizes and modification times) so the
   others, and later runs on unchanged data, reuse it.
2. **Cache** the slices once with :func:`~autocnnp.data.preprocess.build_cache` (modality
   selection, ``slices_per_volume`` slices per case, z-score, resize to ``size``) under
   ``cache`` if the job sets it, else under the job's ``output/cache``. Each cache lives in a
   sub-folder named after its dataset and parameters (``train-<hash>``, ``valid-<hash>``), so jobs
   that share a ``cache`` folder with other parameters do not overwrite each other's caches.
3. **Split** by case: a ``<valid>`` dataset gets its own cache; otherwise the last
   ``valid_fraction`` of the training cases (at least one, in index order, deterministic) are held
   out for validation. Slices of one case never land on both sides.
4. **Augment** the training slices with :class:`~autocnnp.data.augment.RandomAffine2D` (thesis
   Table 2.1: rotation +-45 degrees, zoom 0.8-1.2, shifts up to 5 % of the slice size), seeded with
   the job's seed; the trainer selects the epoch with ``data.train.set_epoch(epoch)``.

``in_channels`` is the number of selected modalities; ``num_classes`` the number of labels that
``dataset.json`` declares (for a CSV index: the largest label value in the cache + 1).
``<test>`` is not used for training; ``autocnnp predict`` reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from autocnnp.data.augment import RandomAffine2D
from autocnnp.data.decathlon import read_dataset, validate_dataset
from autocnnp.data.errors import DataError
from autocnnp.data.preprocess import IMAGES_FILE, META_FILE, CacheDataset, build_cache, exclusive_lock
from autocnnp.run.world import World

from .synthetic import DataBundle

# Thesis Table 2.1 (left atrium): rotation [-45, 45] degrees, zoom [0.8, 1.2], shifts of 25.6 px
# on 512 px slices = 5 % of the slice size (Keras width_shift_range / height_shift_range).
AUGMENT_ROTATION = 45.0
AUGMENT_ZOOM = (0.8, 1.2)
AUGMENT_TRANSLATE = 0.05
MAX_LISTED_PROBLEMS = 3
_STAMP_FORMAT = 1


def parse_modalities(text) -> list[str] | None:
    """``"all"`` (or empty) -> ``None`` (keep every channel); ``"FLAIR, 2"`` -> ``["FLAIR", "2"]``."""
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        return [str(t) for t in text] or None
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts or (len(parts) == 1 and parts[0].lower() == "all"):
        return None
    if any(p.lower() == "all" for p in parts):
        raise DataError(None, f"modalities {text!r} mixes 'all' with modality names",
                        "write either all or a comma-separated list of modality names or channel indices")
    return parts


def problems_error(problems: list[DataError], root, *, limit: int = MAX_LISTED_PROBLEMS) -> DataError:
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


def validate_once(root, state_dir, role: str = "train") -> None:
    """Run :func:`validate_dataset` on ``root`` unless an earlier run stamped the same files; raise on problems.

    Concurrent callers (the ranks of a job) serialise on a lock in ``state_dir``: the first one
    validates and writes the verdict (``validated-<role>-<hash of root>.json``), the others read it.
    """
    state_dir = Path(state_dir)
    where = str(Path(root).resolve())
    stamp = state_dir / f"validated-{role}-{hashlib.sha256(where.encode()).hexdigest()[:12]}.json"
    key = _files_key(root)
    with exclusive_lock(state_dir / ".validate.lock"):
        saved = None
        try:
            saved = json.loads(stamp.read_text())
        except (OSError, ValueError):
            pass
        if (isinstance(saved, dict) and saved.get("format") == _STAMP_FORMAT and saved.get("key") == key
                and saved.get("root") == where):
            problems = [DataError(*p) for p in saved.get("problems", [])]
        else:
            problems = validate_dataset(root)
            record = {"format": _STAMP_FORMAT, "key": key, "root": where,
                      "problems": [[None if p.path is None else str(p.path), p.problem, p.hint] for p in problems]}
            tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, stamp)
    if problems:
        raise problems_error(problems, root)


def cache_folder(cache_root, role: str, root, *, slices_per_volume, slice_mode, size, modalities,
                 normalise) -> Path:
    """``cache_root/<role>-<hash>``: one folder per dataset and pre-processing parameters."""
    params = {"root": str(Path(root).resolve()), "slices": slices_per_volume, "mode": slice_mode, "size": size,
              "modalities": modalities, "normalise": bool(normalise)}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_root) / f"{role}-{digest}"


def is_cache(root) -> bool:
    """Whether ``root`` is a slice cache folder written by ``build_cache`` / ``autocnnp preprocess``."""
    return (Path(root) / META_FILE).is_file() and (Path(root) / IMAGES_FILE).is_file()


def split_cases(names: list[str], valid_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the last ``valid_fraction`` of the cases (at least one, and at least one left to train on)."""
    n = len(names)
    if n < 2:
        raise ValueError(f"{n} labelled case(s) cannot be split into training and validation cases")
    n_valid = min(n - 1, max(1, int(round(n * float(valid_fraction)))))
    return list(names[: n - n_valid]), list(names[n - n_valid:])


def _num_classes(meta: dict) -> int:
    declared = len(meta.get("labels") or {})
    present = len(meta.get("label_counts") or [])
    return max(2, declared or present)


def build(*, world: World, seed: int, cache_dir: Path, train: Path, valid: Path | None = None,
          test: Path | None = None, slices_per_volume: int = 70, slice_mode: str = "labelled", size: int = 128,
          modalities: str = "all", valid_fraction: float = 0.2, augment: bool = True, normalise: bool = True,
          cache: Path | None = None, in_memory: bool = False) -> DataBundle:
    """Validate, cache and split a Decathlon-layout (or CSV-indexed) dataset; see the module docstring.
    A ``train``/``valid`` folder that already is a slice cache (``autocnnp preprocess``) is used as it is."""
    del test  # used by `autocnnp predict`, not for training
    cache_root = Path(cache) if cache is not None else Path(cache_dir)
    mods = parse_modalities(modalities)
    prep = dict(slices_per_volume=int(slices_per_volume), slice_mode=slice_mode, size=int(size), modalities=mods,
                normalise=bool(normalise))

    for role, root in (("train", train), ("valid", valid)):
        if root is not None and not is_cache(root):
            validate_once(root, cache_root, role)

    def cached(role: str, root) -> Path:
        if is_cache(root):  # preprocessed already: the job reads it as it is
            return Path(root)
        folder = cache_folder(cache_root, role, root, **prep)
        start = time.perf_counter()
        build_cache(root, folder, n_slices=prep["slices_per_volume"], size=prep["size"], modalities=mods,
                    mode=slice_mode, normalise=prep["normalise"])
        took = time.perf_counter() - start
        if world.rank == 0 and took > 2.0:
            print(f"autocnnp: {role} slice cache ready in {folder} ({took:.1f} s)", file=sys.stderr, flush=True)
        return folder

    train_cache = cached("train", train)
    augmenter = None
    if augment:
        augmenter = RandomAffine2D(rotation=AUGMENT_ROTATION, zoom=AUGMENT_ZOOM, translate=AUGMENT_TRANSLATE,
                                   seed=int(seed))
    if valid is not None:
        valid_cache = cached("valid", valid)
        train_ds = CacheDataset(train_cache, augment=augmenter, in_memory=in_memory)
        valid_ds = CacheDataset(valid_cache, in_memory=in_memory)
        if valid_ds.num_channels != train_ds.num_channels:
            raise DataError(valid, f"validation images have {valid_ds.num_channels} channel(s) after modality "
                            f"selection, training images {train_ds.num_channels}",
                            "give both datasets the same modalities")
    else:
        full = CacheDataset(train_cache)
        names = [c["name"] for c in full.meta["cases"]]
        try:
            train_names, valid_names = split_cases(names, valid_fraction)
        except ValueError as exc:
            raise DataError(train, str(exc), "add cases, or name a separate validation dataset with "
                            "<valid><path>...</path></valid>") from None
        train_ds = CacheDataset(train_cache, augment=augmenter, indices=full.indices_of_cases(train_names),
                                in_memory=in_memory)
        valid_ds = CacheDataset(train_cache, indices=full.indices_of_cases(valid_names), in_memory=in_memory)

    num_classes = max(_num_classes(train_ds.meta), _num_classes(valid_ds.meta))
    return DataBundle(train_ds, valid_ds, train_ds.num_channels, num_classes)
