"""Inference: ``autocnnp predict`` segments volumes with a trained job's checkpoint and ``autocnnp
evaluate`` scores label volumes against references with SegEval.

Predict asks the job's data format how a volume becomes the model's input and back
(``DataFormat.volumes()``), its checkpoint action which checkpoint is the latest, and its architecture
action for the network: it never guesses from the configuration. Heavy modules are imported when a
command runs, so the CLI starts without torch.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

from .core.cli_args import positive
from .core.errors import DataError, JobError
from .core.metrics import SEGEVAL
from .generator.assemble import assemble
from .generator.overrides import parse_sets, read_variant

OVERALL = "overall"


def predict(args) -> int:
    import numpy as np
    import torch

    from .data.volumes import load_case, save_label

    gen = assemble(read_variant(args.job, parse_sets(args.set)))
    data = gen.action("dataset_injection")
    transform = gen.data_format().volumes()
    if transform is None:
        raise JobError(data.where or gen.job.where, f"predict needs volumes, but the job's data format "
                       f"'{data.entry.name}' has none", "predict with a job that trained on NIfTI volumes "
                       "(<data format=\"decathlon\">)")
    cases = transform.cases(Path(args.input) if args.input else transform.default_input, args.split)
    out = Path(args.out) if args.out else gen.rundir.predictions
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a folder", "name a folder for the predicted label volumes")
    checkpoints = gen.action("checkpoint").build(directory=gen.rundir.checkpoints, rank=0)
    checkpoint = Path(args.checkpoint) if args.checkpoint else checkpoints.latest()
    if checkpoint is None:
        raise JobError(gen.job.where, f"no checkpoint in {gen.rundir.checkpoints}",
                       f"train first (autocnnp run {args.job}) or pass --checkpoint")
    if not checkpoint.is_file():
        raise JobError(gen.job.where, f"checkpoint {checkpoint} does not exist", "fix --checkpoint")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise DataError(checkpoint, f"cannot be read as a checkpoint ({type(exc).__name__}: {exc})",
                        "pass another --checkpoint") from None
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise DataError(checkpoint, "holds no model state dict", "pass a checkpoint written by autocnnp run")
    weights = {k.removeprefix("module."): v for k, v in weights.items()}
    num_classes = args.num_classes or state.get("num_classes") or transform.num_classes
    if num_classes is None:
        raise DataError(checkpoint, "the number of classes the model was trained with is not recorded",
                        "pass --num-classes")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, in_channels = None, state.get("in_channels")
    out.mkdir(parents=True, exist_ok=True)
    total_slices, total_infer, total_wall = 0, 0.0, 0.0
    size = transform.size
    print(f"predicting {len(cases)} volume(s) with {checkpoint} on {device} (slices resized to {size} x {size})")
    for case in cases:
        start = time.perf_counter()
        image, _, affine, header = load_case(case)
        slices = transform.to_slices(image, case.image)
        if model is None:
            in_channels = in_channels or slices.shape[1]
            model = gen.action("architecture_injection").build(in_channels=in_channels, num_classes=num_classes)
            try:
                model.load_state_dict(weights)
            except RuntimeError as exc:
                raise DataError(checkpoint, f"does not fit the job's architecture with {in_channels} input "
                                f"channel(s) and {num_classes} classes ({str(exc).splitlines()[0]})",
                                "predict with the job the checkpoint was trained by, or pass --num-classes") from None
            model.to(device).eval()
        if slices.shape[1] != in_channels:
            raise DataError(case.image, f"image has {slices.shape[1]} channel(s) after modality selection, the model "
                            f"takes {in_channels}", "give every input the same modalities")
        labels = np.empty((len(slices), size, size), dtype=np.uint8)
        infer = 0.0
        with torch.inference_mode():
            for lo in range(0, len(slices), args.batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(slices[lo:lo + args.batch_size])).to(device)
                t0 = time.perf_counter()
                logits = model(batch)
                pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                infer += time.perf_counter() - t0
                labels[lo:lo + len(batch)] = pred.to(torch.uint8).cpu().numpy()
        target = out / f"{case.name}.nii.gz"
        save_label(transform.to_volume(labels, image.shape), affine, header, target)
        wall = time.perf_counter() - start
        depth = len(slices)
        total_slices, total_infer, total_wall = total_slices + depth, total_infer + infer, total_wall + wall
        print(f"  {case.name}: {depth} slices, inference {1000 * infer / max(depth, 1):.2f} ms/slice, "
              f"{wall:.3f} s/volume (load, preprocess, infer, write) -> {target}")
    print(f"{len(cases)} volume(s), {total_slices} slices: inference {1000 * total_infer / max(total_slices, 1):.2f} "
          f"ms/slice, {total_wall / max(len(cases), 1):.3f} s/volume on average; label volumes in {out}")
    return 0


def _reference_labels(ref: Path) -> tuple[dict[str, Path], int | None]:
    """``({case: label file}, declared number of classes or None)`` of a dataset or a folder of labels."""
    from .data.index import is_dataset, nifti_files, read_dataset

    if is_dataset(ref):
        ds = read_dataset(ref)
        return {c.name: Path(c.label) for c in ds.training}, (len(ds.labels) or None)
    if ref.is_dir():
        return nifti_files(ref), None
    raise DataError(ref, "is neither a dataset (dataset.json / CSV) nor a folder of label volumes",
                    "name the dataset the images came from or a folder of reference label files")


def _table(rows: list[dict], columns) -> str:
    head = ["case", *columns]
    cells = [[str(r["case"]), *(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns)]
             for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in cells]
    return "\n".join(lines)


def evaluate(args) -> int:
    import numpy as np
    import torch

    from .data.index import nifti_files
    from .data.volumes import load_labels
    from .training.metrics import confusion_matrix, segmentation_metrics

    pred_dir, ref = Path(args.pred), Path(args.ref)
    if not pred_dir.is_dir():
        raise DataError(pred_dir, "is not a folder of predicted label volumes", "name the folder `autocnnp predict` wrote")
    preds = nifti_files(pred_dir)
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
        pred, pred_affine = load_labels(preds[name])
        truth, ref_affine = load_labels(refs[name])
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
    columns = (*SEGEVAL, "voxels")
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case", *columns])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    print(_table(rows, columns))
    print(f"{len(matrices)} case(s), {num_classes} classes; overall from the summed confusion matrix; wrote {out}")
    return 0


def add_commands(sub) -> None:
    """Add ``predict`` and ``evaluate`` to the ``autocnnp`` sub-parsers ``sub``."""
    doc = "segment volumes slice by slice with a trained job's checkpoint and write NIfTI label volumes"
    s = sub.add_parser("predict", help=doc, description=doc)
    s.add_argument("job", help="the XML job file the model was trained with")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="the job variant that was trained (as `autocnnp run --set`)")
    s.add_argument("--checkpoint", default=None, help="checkpoint file (default: the latest in the job's output)")
    s.add_argument("--input", default=None,
                   help="dataset folder/index, folder of NIfTI images or one image (default: the job's <test>, "
                        "else its <train> dataset)")
    s.add_argument("--split", choices=("test", "training", "all"), default="test",
                   help="which cases of a dataset input to segment (default test)")
    s.add_argument("--out", default=None,
                   help="folder for the label volumes <case>.nii.gz (default: predictions/ in the job's output)")
    s.add_argument("--num-classes", type=positive, default=None,
                   help="classes the model was trained with (default: recorded in the checkpoint)")
    s.add_argument("--batch-size", type=positive, default=16, help="slices per forward pass (default 16)")
    s.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    s.set_defaults(func=predict)

    doc = "score predicted label volumes against references with SegEval, per case and overall"
    s = sub.add_parser("evaluate", help=doc, description=doc)
    s.add_argument("pred", help="folder of predicted label volumes (<case>.nii.gz)")
    s.add_argument("ref", help="the dataset (dataset.json / CSV) or a folder of reference label volumes")
    s.add_argument("--out", default=None, help="CSV file to write (default PRED/metrics.csv)")
    s.add_argument("--num-classes", type=positive, default=None,
                   help="number of classes (default: the labels dataset.json declares, else the largest label + 1)")
    s.set_defaults(func=evaluate)
