"""Data commands of the ``autocnnp`` CLI: synth, preprocess, check-data, predict, evaluate.

``add_commands(sub)`` adds them to the CLI's sub-parsers. Heavy modules (numpy, nibabel, torch)
are imported inside the command functions, so ``autocnnp validate`` stays fast and torch-free.
Bad data is reported as one :class:`~autocnnp.data.errors.DataError` paragraph on stderr with exit
code 2; a bad job file as a :class:`~autocnnp.engine.errors.JobError` (the CLI prints it).

* ``autocnnp synth OUT --kind brain|atrium --cases N --shape X Y Z --seed S --test-cases T``
* ``autocnnp preprocess DATA CACHE --slices N --size S --mode even|labelled --modalities all``
* ``autocnnp check-data DATA [--num-classes K]``
* ``autocnnp predict JOB.xml [--checkpoint CKPT] [--input DATA] [--split test] [--out DIR]``
* ``autocnnp evaluate PRED_DIR REF [--num-classes K] [--out metrics.csv]``
"""

from __future__ import annotations

import functools
import re
import sys
import time
from pathlib import Path

from .errors import DataError

METRIC_COLUMNS = ("dice", "pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
OVERALL = "overall"
_CKPT = re.compile(r"^ckpt-epoch(\d{4,})\.pt$")


def _reports_data_errors(fn):
    """Print a DataError as ``autocnnp: path: problem. Hint: fix.`` and return its exit code (2)."""

    @functools.wraps(fn)
    def wrapper(args) -> int:
        try:
            return fn(args)
        except DataError as exc:
            print(f"autocnnp: {exc}", file=sys.stderr)
            return DataError.exit_code

    return wrapper


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _is_dataset(path: Path) -> bool:
    """A Decathlon folder (holding dataset.json), a dataset.json-style file or a CSV index."""
    if path.is_dir():
        return (path / "dataset.json").is_file()
    return path.is_file() and path.suffix.lower() in (".json", ".csv")


def _nifti_files(folder: Path) -> dict[str, Path]:
    """``{case name: file}`` of the NIfTI files in ``folder`` (not recursive)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and _is_nifti(p))
    out: dict[str, Path] = {}
    for p in files:
        name = _case_name(p)
        if name in out:
            raise DataError(p, f"two files in the folder are case {name!r} ({out[name].name} and {p.name})",
                            "keep one file per case")
        out[name] = p
    return out


# --------------------------------------------------------------------------------------------
# synth

@_reports_data_errors
def cmd_synth(args) -> int:
    from .synthetic import write_synthetic_dataset

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a folder", "name a new or an existing folder")
    try:
        write_synthetic_dataset(out, args.kind, cases=args.cases, shape=tuple(args.shape), seed=args.seed,
                                test_cases=args.test_cases)
    except ValueError as exc:
        raise DataError(out, str(exc), "see `autocnnp synth --help`") from None
    print(f"wrote {args.cases} training and {args.test_cases} test {args.kind} case(s) of shape "
          f"{' x '.join(str(s) for s in args.shape)} (seed {args.seed}) to {out} "
          f"(dataset.json, imagesTr/, labelsTr/, imagesTs/)")
    return 0


# --------------------------------------------------------------------------------------------
# preprocess

@_reports_data_errors
def cmd_preprocess(args) -> int:
    from autocnnp.components.datasets.decathlon import parse_modalities

    from .preprocess import META_FILE, build_cache, read_cache_meta

    cache = Path(args.cache)
    meta_file = cache / META_FILE
    before = meta_file.stat().st_mtime_ns if meta_file.is_file() else None
    start = time.perf_counter()
    build_cache(args.data, cache, n_slices=args.slices, size=args.size, modalities=parse_modalities(args.modalities),
                mode=args.mode, normalise=not args.no_normalise)
    seconds = time.perf_counter() - start
    meta = read_cache_meta(cache)
    reused = before is not None and meta_file.stat().st_mtime_ns == before
    h, w = meta["size"]
    print(f"{cache}: {meta['count']} slices of {meta['channels']} x {h} x {w} from {len(meta['cases'])} case(s) "
          f"in {seconds:.2f} s{' (up to date, reused)' if reused else ''}")
    return 0


# --------------------------------------------------------------------------------------------
# check-data

@_reports_data_errors
def cmd_check_data(args) -> int:
    from .decathlon import read_dataset, validate_dataset

    problems = validate_dataset(args.data, num_classes=args.num_classes)
    if problems:
        for p in problems:
            print(p)
        print(f"autocnnp: {args.data}: {len(problems)} problem(s) found", file=sys.stderr)
        return DataError.exit_code
    ds = read_dataset(args.data)
    mods = ", ".join(f"{i}={n}" for i, n in ds.modalities.items()) or "not declared"
    labels = ", ".join(f"{i}={n}" for i, n in ds.labels.items()) or "not declared"
    print(f"{args.data}: OK: {ds.name!r}, {len(ds.training)} labelled and {len(ds.test)} test case(s); "
          f"modalities: {mods}; labels: {labels}")
    return 0


# --------------------------------------------------------------------------------------------
# predict

def _predict_cases(source: Path, split: str):
    """The cases to predict: a dataset's ``split``, every NIfTI file in a folder, or one file."""
    from .decathlon import Case, read_dataset

    if not source.exists():
        raise DataError(source, "input does not exist", "name a dataset folder, a folder of NIfTI images or a file")
    if source.is_file() and _is_nifti(source):
        return [Case(_case_name(source), source, None)], None
    if _is_dataset(source):
        ds = read_dataset(source)
        cases = [Case(c.name, c.image, None) for c in ds.cases(split)]
        if not cases:
            raise DataError(ds.index_file, f"the dataset lists no {split} cases",
                            "pick another --split (test, training or all) or another --input")
        return cases, ds
    if source.is_dir():
        files = _nifti_files(source)
        if not files:
            raise DataError(source, "the folder holds no NIfTI images (.nii or .nii.gz) and no dataset.json",
                            "name a Decathlon dataset folder or a folder of images")
        return [Case(name, path, None) for name, path in files.items()], None
    raise DataError(source, "is neither a NIfTI image, a dataset index nor a folder",
                    "name a dataset folder, a folder of NIfTI images or a file")


def _latest_checkpoint(folder: Path) -> Path | None:
    try:
        name = (folder / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if _CKPT.match(name) and (folder / name).is_file():
        return folder / name
    found = sorted((int(m.group(1)), p) for p in (folder.iterdir() if folder.is_dir() else [])
                   if (m := _CKPT.match(p.name)))
    return found[-1][1] if found else None


def _num_classes_for(cfg, cache_root: Path) -> int | None:
    """Classes the model was trained with: dataset.json's labels, else the training cache's meta."""
    import json

    from .decathlon import read_dataset

    try:
        labels = read_dataset(cfg.train).labels
    except DataError:
        labels = {}
    if labels:
        return max(2, len(labels))
    for meta_file in sorted(cache_root.glob("train-*/meta.json")):
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            continue
        if str(meta.get("source")) == str(_index_file(cfg.train)):
            return max(2, len(meta.get("labels") or {}) or len(meta.get("label_counts") or []))
    return None


def _index_file(root) -> Path:
    p = Path(root)
    return (p / "dataset.json").resolve() if p.is_dir() else p.resolve()


def _modality_indices(mods, indexes) -> list[int] | None:
    """Channel indices of ``mods`` (names or indices), resolving names with the first index that knows them."""
    if mods is None:
        return None
    out = []
    for m in mods:
        if m.lstrip("-").isdigit():
            out.append(int(m))
            continue
        for ds in indexes:
            if ds is not None and ds.modalities:
                out.append(ds.modality_index(m))
                break
        else:
            raise DataError(None, f"modality {m!r} is a name but no dataset.json declares the modalities",
                            "name the modalities by channel index in the job")
    return out


def _save_label(volume, affine, header, path: Path) -> None:
    import nibabel as nib
    import numpy as np

    cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    hdr = header.copy() if header is not None else None
    img = cls(volume.astype(np.uint8), affine, hdr)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, float(volume.max()) if volume.size else 0
    img.header.set_intent("label")
    img.set_qform(affine, code=int(img.header["qform_code"]) or 1)
    img.set_sform(affine, code=int(img.header["sform_code"]) or 1)
    nib.save(img, str(path))


@_reports_data_errors
def cmd_predict(args) -> int:
    import numpy as np
    import torch

    from autocnnp.components.datasets.decathlon import parse_modalities
    from autocnnp.generator.assemble import assemble

    from .decathlon import load_case, read_dataset
    from .preprocess import resize, select_modalities, take_slices, zscore
    from ..engine.errors import JobError

    gen = assemble(args.job)
    data = gen.action("dataset_injection")
    cfg = data.config
    if cfg is None or not all(hasattr(cfg, k) for k in ("train", "size", "modalities", "normalise")):
        raise JobError(data.where or gen.job.where, f"predict needs NIfTI data (<data format=\"decathlon\">), the "
                       f"job uses '{data.entry.name}'", "predict with a job that trained on a NIfTI dataset")
    size = int(cfg.size)
    cache_root = Path(cfg.cache) if getattr(cfg, "cache", None) is not None else gen.output / "cache"

    source = Path(args.input) if args.input else (Path(cfg.test) if getattr(cfg, "test", None) else Path(cfg.train))
    cases, input_index = _predict_cases(source, args.split)
    out = Path(args.out) if args.out else gen.output / "predictions"
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a folder", "name a folder for the predicted label volumes")

    checkpoint = Path(args.checkpoint) if args.checkpoint else _latest_checkpoint(gen.output / "checkpoints")
    if checkpoint is None:
        raise JobError(gen.job.where, f"no checkpoint in {gen.output / 'checkpoints'}",
                       f"train first (autocnnp run {args.job}) or pass --checkpoint")
    if not checkpoint.is_file():
        raise JobError(gen.job.where, f"checkpoint {checkpoint} does not exist", "fix --checkpoint")

    try:
        train_index = read_dataset(cfg.train)
    except DataError:
        train_index = None
    mods = _modality_indices(parse_modalities(cfg.modalities), [input_index, train_index])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise DataError(checkpoint, f"cannot be read as a checkpoint ({type(exc).__name__}: {exc})",
                        "pass another --checkpoint") from None
    # The checkpoint records what the model was trained with; older ones fall back to the dataset.
    recorded = state.get("num_classes") if isinstance(state, dict) else None
    num_classes = args.num_classes or recorded or _num_classes_for(cfg, cache_root)
    if num_classes is None:
        raise DataError(cfg.train, "the number of classes the model was trained with is not declared",
                        "pass --num-classes")
    weights = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise DataError(checkpoint, "holds no model state dict", "pass a checkpoint written by autocnnp run")
    weights = {k.removeprefix("module."): v for k, v in weights.items()}

    first = True
    model = None
    out.mkdir(parents=True, exist_ok=True)
    total_slices, total_infer, total_wall = 0, 0.0, 0.0
    print(f"predicting {len(cases)} volume(s) with {checkpoint} on {device} (slices resized to {size} x {size})")
    for case in cases:
        start = time.perf_counter()
        image, _, affine, header = load_case(case)
        try:
            image = select_modalities(image, mods)
        except ValueError as exc:
            raise DataError(case.image, str(exc), "predict on images with the modalities the model was trained on")
        if first:
            in_channels = int(image.shape[-1])
            model = gen.action("architecture_injection").build(in_channels=in_channels, num_classes=num_classes)
            try:
                model.load_state_dict(weights)
            except RuntimeError as exc:
                raise DataError(checkpoint, f"does not fit the job's architecture with {in_channels} input "
                                f"channel(s) and {num_classes} classes ({str(exc).splitlines()[0]})",
                                "predict with the job the checkpoint was trained by, or pass --num-classes") from None
            model.to(device).eval()
            first = False
        elif image.shape[-1] != in_channels:
            raise DataError(case.image, f"image has {image.shape[-1]} channel(s) after modality selection, the model "
                            f"takes {in_channels}", "give every input the same modalities")
        if cfg.normalise:
            image = zscore(image)
        x_size, y_size, depth = image.shape[:3]
        slices, _ = take_slices(image, None, np.arange(depth))
        del image
        slices = resize(slices, (size, size))
        labels = np.empty((depth, size, size), dtype=np.uint8)
        infer = 0.0
        with torch.inference_mode():
            for lo in range(0, depth, args.batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(slices[lo:lo + args.batch_size])).to(device)
                t0 = time.perf_counter()
                logits = model(batch)
                pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                infer += time.perf_counter() - t0
                labels[lo:lo + len(batch)] = pred.to(torch.uint8).cpu().numpy()
        labels = resize(labels, (x_size, y_size), label=True)  # nearest neighbour back to the source grid
        volume = np.ascontiguousarray(np.moveaxis(labels, 0, 2))  # (X, Y, Z)
        target = out / f"{case.name}.nii.gz"
        _save_label(volume, affine, header, target)
        wall = time.perf_counter() - start
        total_slices, total_infer, total_wall = total_slices + depth, total_infer + infer, total_wall + wall
        print(f"  {case.name}: {depth} slices, inference {1000 * infer / max(depth, 1):.2f} ms/slice, "
              f"{wall:.3f} s/volume (load, preprocess, infer, write) -> {target}")
    print(f"{len(cases)} volume(s), {total_slices} slices: inference {1000 * total_infer / max(total_slices, 1):.2f} "
          f"ms/slice, {total_wall / max(len(cases), 1):.3f} s/volume on average; label volumes in {out}")
    return 0


# --------------------------------------------------------------------------------------------
# evaluate

def _reference_labels(ref: Path):
    """``({case: label file}, declared number of classes or None)`` of a dataset or a folder of labels."""
    from .decathlon import read_dataset

    if _is_dataset(ref):
        ds = read_dataset(ref)
        return {c.name: Path(c.label) for c in ds.training}, (len(ds.labels) or None)
    if ref.is_dir():
        return _nifti_files(ref), None
    raise DataError(ref, "is neither a dataset (dataset.json / CSV) nor a folder of label volumes",
                    "name the dataset the images came from or a folder of reference label files")


def _load_labels(path: Path):
    import numpy as np

    from .decathlon import _label_shape, _open_nifti, _read_array

    img = _open_nifti(path)
    shape = _label_shape(path, img.shape)
    raw = _read_array(path, img).reshape(shape)
    if raw.dtype.kind == "f":
        rounded = np.rint(raw)
        if not np.array_equal(rounded, raw):
            raise DataError(path, "label map holds non-integer (or NaN) values", "store labels as integers")
        raw = rounded
    if raw.size and raw.min() < 0:
        raise DataError(path, f"label map holds negative values ({int(raw.min())})", "store class indices 0, 1, ...")
    return raw.astype(np.int64), np.asarray(img.affine)


def _table(rows: list[dict], columns) -> str:
    head = ["case", *columns]
    cells = [[str(r["case"]), *(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns)]
             for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in cells]
    return "\n".join(lines)


@_reports_data_errors
def cmd_evaluate(args) -> int:
    import csv

    import numpy as np
    import torch

    from autocnnp.training.metrics import confusion_matrix, segmentation_metrics

    pred_dir, ref = Path(args.pred), Path(args.ref)
    if not pred_dir.is_dir():
        raise DataError(pred_dir, "is not a folder of predicted label volumes",
                        "name the folder `autocnnp predict` wrote")
    preds = _nifti_files(pred_dir)
    if not ref.exists():
        raise DataError(ref, "reference does not exist", "name the dataset or a folder of reference label files")
    refs, declared = _reference_labels(ref)
    matched = [name for name in preds if name in refs]
    if not matched:
        raise DataError(pred_dir, f"no prediction matches a reference case of {ref} by name",
                        "predictions must be named like the cases (case_000.nii.gz for case_000)")
    unmatched = [name for name in preds if name not in refs]
    if unmatched:
        print(f"autocnnp: note: {len(unmatched)} prediction(s) have no reference and are skipped: "
              f"{', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}", file=sys.stderr)

    # One case in memory at a time. A confusion matrix padded with classes that occur nowhere has the
    # same metrics (absent classes are left out), so per-case matrices are summed after padding.
    fixed = args.num_classes or declared
    rows, matrices = [], []
    for name in matched:
        pred, pred_affine = _load_labels(preds[name])
        truth, ref_affine = _load_labels(refs[name])
        if pred.shape != truth.shape:
            raise DataError(preds[name], f"prediction shape {pred.shape} differs from reference shape {truth.shape} "
                            f"of {refs[name]}", "predict on the reference's own images (autocnnp predict keeps "
                            "the source shape)")
        if not np.allclose(pred_affine, ref_affine, atol=1e-3):
            print(f"autocnnp: warning: {preds[name]}: affine differs from the reference {refs[name]}; "
                  "comparing voxel by voxel", file=sys.stderr)
        k = max(2, int(fixed)) if fixed else max(2, int(pred.max(initial=0)) + 1, int(truth.max(initial=0)) + 1)
        try:
            conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth), k)
        except ValueError as exc:
            path = preds[name] if int(pred.max(initial=0)) >= k else refs[name]
            raise DataError(path, f"{exc} ({k} classes)", "pass --num-classes or fix the labels") from None
        del pred, truth
        matrices.append(conf)
        rows.append({"case": name, **segmentation_metrics(conf), "voxels": int(conf.sum())})
    num_classes = max(m.shape[0] for m in matrices)
    total = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for m in matrices:
        total[: m.shape[0], : m.shape[1]] += m
    rows.append({"case": OVERALL, **segmentation_metrics(total), "voxels": int(total.sum())})

    out = Path(args.out) if args.out else pred_dir / "metrics.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = (*METRIC_COLUMNS, "voxels")
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case", *columns])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    print(_table(rows, columns))
    print(f"{len(matrices)} case(s), {num_classes} classes; overall from the summed confusion matrix; wrote {out}")
    return 0


# --------------------------------------------------------------------------------------------
# registration

def _int_at_least(text: str, minimum: int, requirement: str) -> int:
    """``text`` as an integer of at least ``minimum``; otherwise an argparse error ending "``requirement``, got N"."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{requirement}, got {value}")
    return value


def _positive(text: str) -> int:
    return _int_at_least(text, 1, "must be at least 1")


def _count(text: str) -> int:
    return _int_at_least(text, 0, "must be >= 0")


def add_commands(sub) -> None:
    """Add the data commands to the ``autocnnp`` sub-parsers ``sub``."""
    doc = "write a small seeded synthetic dataset in the Decathlon layout (dataset.json, imagesTr, labelsTr)"
    s = sub.add_parser("synth", help=doc, description=doc)
    s.add_argument("out", help="the dataset folder to write")
    s.add_argument("--kind", choices=("brain", "atrium"), default="brain",
                   help="brain: 4 modalities, labels 0-3 (like Task01_BrainTumour); atrium: 1 modality, labels 0-1 "
                        "(like Task02_Heart)")
    s.add_argument("--cases", type=_count, default=6, help="labelled training cases (default 6)")
    s.add_argument("--shape", type=_positive, nargs=3, default=[32, 32, 16], metavar=("X", "Y", "Z"),
                   help="volume shape in voxels (default 32 32 16)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--test-cases", type=_count, default=1, help="unlabelled test cases (default 1)")
    s.set_defaults(func=cmd_synth)

    doc = "build the 2D slice cache of a dataset (what a decathlon job builds before training) and time it"
    s = sub.add_parser("preprocess", help=doc, description=doc)
    s.add_argument("data", help="dataset folder (dataset.json) or CSV index")
    s.add_argument("cache", help="cache folder to write")
    s.add_argument("--slices", type=_count, default=70, help="slices per volume, 0 for all (default 70)")
    s.add_argument("--size", type=_positive, default=128, help="slice size in pixels (default 128)")
    s.add_argument("--mode", choices=("even", "labelled"), default="labelled",
                   help="spread slices over the whole volume or over the labelled part (default)")
    s.add_argument("--modalities", default="all", help="'all' or comma-separated modality names or indices")
    s.add_argument("--no-normalise", action="store_true", help="skip the per-case z-score")
    s.set_defaults(func=cmd_preprocess)

    doc = "check a dataset: every file readable, shapes, affines, label values; prints every problem"
    s = sub.add_parser("check-data", help=doc, description=doc)
    s.add_argument("data", help="dataset folder (dataset.json), dataset.json file or CSV index")
    s.add_argument("--num-classes", type=_positive, default=None, help="also check labels are below this")
    s.set_defaults(func=cmd_check_data)

    doc = "segment volumes slice by slice with a trained job's checkpoint and write NIfTI label volumes"
    s = sub.add_parser("predict", help=doc, description=doc)
    s.add_argument("job", help="the XML job file the model was trained with")
    s.add_argument("--checkpoint", default=None, help="checkpoint file (default: the latest in the job's output)")
    s.add_argument("--input", default=None,
                   help="dataset folder/index, folder of NIfTI images or one image (default: the job's <test>, "
                        "else its <train> dataset)")
    s.add_argument("--split", choices=("test", "training", "all"), default="test",
                   help="which cases of a dataset input to segment (default test)")
    s.add_argument("--out", default=None,
                   help="folder for the label volumes <case>.nii.gz (default: predictions/ in the job's output)")
    s.add_argument("--num-classes", type=_positive, default=None,
                   help="classes the model was trained with (default: from dataset.json or the training cache)")
    s.add_argument("--batch-size", type=_positive, default=16, help="slices per forward pass (default 16)")
    s.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    s.set_defaults(func=cmd_predict)

    doc = "score predicted label volumes against references with SegEval, per case and overall"
    s = sub.add_parser("evaluate", help=doc, description=doc)
    s.add_argument("pred", help="folder of predicted label volumes (<case>.nii.gz)")
    s.add_argument("ref", help="the dataset (dataset.json / CSV) or a folder of reference label volumes")
    s.add_argument("--out", default=None, help="CSV file to write (default PRED/metrics.csv)")
    s.add_argument("--num-classes", type=_positive, default=None,
                   help="number of classes (default: the labels dataset.json declares, else the largest label + 1)")
    s.set_defaults(func=cmd_evaluate)
