"""``autocnnp export``: a trained checkpoint as deployable files, and their int8 form.

``export CHECKPOINT --to DIR`` writes into DIR:

* ``model.onnx``: the network (input ``image`` ``[N, C, H, W]`` float32, 3D ``[N, C, D, H, W]``, output ``logits``;
  the batch and the spatial axes dynamic), checked against torch on the run's validation slices
  (``label_agreement``; 2D: 3D runs cache volumes, not slices, and are exported without this check);
* ``model.torchscript.pt``: torch's own serialised form (``torch.jit.load`` runs it without autocnnp);
* ``model.json``: the model card (the checkpoint's: job, architecture, classes, input transform) with what
  was exported and measured.

``--int8`` adds ``model.int8.onnx``: ONNX Runtime's post-training static quantization (QDQ, int8 weights and
activations), calibrated on slices of the run's training slice cache, and scores fp32 and int8 on the held-out
(validation) slices: Dice per class. A drop of more than ``--max-dice-drop`` in any class refuses the int8
model (nothing written) with the figures. ``autocnnp predict --checkpoint DIR/model.onnx`` (or the int8 file)
runs them with ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .core.card import card_dimension
from .core.errors import DataError, JobError
from .core.files import atomic_write
from .core.rundir import EXPORT_CARD, LATEST_POINTER

ONNX_FILE, INT8_FILE, TORCHSCRIPT_FILE = "model.onnx", "model.int8.onnx", "model.torchscript.pt"
OPSET = 17
INPUT, OUTPUT = "image", "logits"


@dataclass(frozen=True)
class ExportOptions:
    """What ``export`` reads and writes (``autocnnp export``'s options)."""

    checkpoint: str = LATEST_POINTER  #: latest, best, a checkpoint file, a latest/best file or a run folder
    job: Path | str | None = None  #: the job file of the run (for latest/best)
    sets: tuple[str, ...] = ()  #: the job variant that was trained, KEY=VALUE
    to: Path | str | None = None  #: the folder to write (default: export/ in the run's output folder)
    int8: bool = False  #: also quantize to int8 (calibrated on the run's training slice cache)
    cache: Path | str | None = None  #: the slice cache to calibrate on and score (default: the run's caches)
    calibration_slices: int = 64  #: training slices the int8 calibration reads
    max_dice_drop: float = 0.01  #: refuse an int8 model whose Dice of any class drops by more than this
    opset: int = OPSET  #: ONNX opset


@dataclass
class Exported:
    """What ``export`` wrote and measured."""

    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    card: dict = field(default_factory=dict)


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise JobError(Path(module), f"the {module} package is not installed", "install the export extras (make venv "
                       "installs requirements/export.txt: onnx, onnxruntime, onnxscript)") from None


def export_onnx(model, example, path: Path, opset: int, where: Path) -> None:
    """``model`` (a torch module, eval mode) as ONNX at ``path``, batch and spatial axes dynamic; an operator ONNX
    cannot express is one DataError naming it."""
    import torch

    _need("onnx")
    spatial = {0: "batch", **{2 + i: name for i, name in enumerate(("depth", "height", "width")[-(example.dim() - 2):])}}
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            torch.onnx.export(model, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: spatial, OUTPUT: spatial}, opset_version=opset, dynamo=False)
    except torch.onnx.errors.UnsupportedOperatorError as exc:
        found = re.search(r"operator '([^']+)'", str(exc))
        operator = found.group(1) if found else str(exc).splitlines()[0]
        raise DataError(where, f"the network uses the operator {operator}, which ONNX (opset {opset}) cannot express",
                        "write that step of the architecture with standard layers (convolutions, pooling, "
                        "interpolation, activations), or deploy the TorchScript form instead") from None


def example_sides(card: dict) -> list[int]:
    """The spatial sides of the example input the export traces: a 3D network's patch, a 2D network's slice."""
    if card_dimension(card) == "3d":
        return [int(n) for n in card["patch_size"]]
    return [int(card["size"])] * 2


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _caches(trained, given: Path | None) -> tuple[Path, Path]:
    """The training and held-out slice caches: ``given`` (split as the job splits it), else the run's."""
    from .data.preprocess import is_cache

    if given is not None:
        if not is_cache(given):
            raise DataError(given, "is not a slice cache", "name a folder written by autocnnp preprocess or a run's "
                            "cache/train-* folder")
        return given, given
    root = trained.rundir.cache
    found = {role: sorted((p for p in root.glob(f"{role}-*") if is_cache(p)), key=lambda p: p.stat().st_mtime)
             for role in ("train", "valid")}
    if not found["train"] or not found["valid"]:
        raise DataError(root, "holds no training and validation slice caches of the run the checkpoint comes from",
                        "pass --cache with a slice cache (autocnnp preprocess) to calibrate on and score")
    return found["train"][-1], found["valid"][-1]


def _slices(cache: Path, count: int | None):
    """``count`` slices (None: all) of a slice cache, evenly spread: images ``[N, C, H, W]`` and labels ``[N, H, W]``."""
    import numpy as np

    from .data.preprocess import CacheDataset

    data = CacheDataset(cache, in_memory=False)
    n = len(data)
    picked = np.arange(n) if count is None or count >= n else np.linspace(0, n - 1, count).round().astype(np.int64)
    images, labels = data.read_batch(picked)
    return images.numpy().astype(np.float32), labels.numpy()


def dice_per_class(predicted, reference, classes: int) -> list[float]:
    """Dice of each class over all the voxels given (NaN where a class is in neither)."""
    from .training.metrics import class_scores, volume_confusion

    return [float(v) for v in class_scores(volume_confusion(predicted, reference, classes))["dice"]]


def labels_of(run, images, batch: int = 8):
    """Argmax labels of ``images`` through ``run`` (a function from a float32 batch to logits)."""
    import numpy as np

    out = [np.argmax(run(images[i:i + batch]), axis=1) for i in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


def quantize(fp32: Path, int8: Path, calibration) -> None:
    """Static int8 quantization (QDQ, per-channel weights) of ``fp32`` into ``int8``, calibrated on ``calibration``
    (float32 ``[N, C, H, W]``, one slice at a time)."""
    q = _need("onnxruntime.quantization")

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.items = iter([{INPUT: calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.items, None)

    prepared = int8.with_name(int8.stem + ".prep.onnx")
    try:
        q.shape_inference.quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        q.quantize_static(str(prepared), str(int8), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                          calibrate_method=q.CalibrationMethod.MinMax)
    finally:
        prepared.unlink(missing_ok=True)


def export(options: ExportOptions) -> Exported:
    """Export a checkpoint (see the module docstring); prints what it wrote."""
    import torch

    from . import inference
    from .generator.assemble import assemble
    from .generator.overrides import parse_sets, read_variant
    from .training.ensemble import onnx_logits, onnx_session

    gen = assemble(read_variant(options.job, parse_sets(list(options.sets)))) if options.job else None
    checkpoint = inference._checkpoint_path(options.checkpoint, gen)
    state = inference._load_checkpoint(checkpoint)
    trained, transform, classes, names, in_channels = inference._model_and_transform(state, checkpoint, gen, None)
    if in_channels is None:
        raise DataError(checkpoint, "does not record its input channels", "export a checkpoint written by autocnnp run")
    model = inference._build_network(trained, state["model"], in_channels, classes, checkpoint).eval()
    folder = Path(options.to) if options.to else trained.rundir.export
    folder.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((1, in_channels, *example_sides(transform.card())), dtype=torch.float32)
    out = Exported(folder)
    onnx_path = folder / ONNX_FILE
    partial = folder / (ONNX_FILE + ".partial")
    with torch.no_grad():
        export_onnx(model, example, partial, options.opset, checkpoint)
        partial.replace(onnx_path)
        with warnings.catch_warnings():  # deprecated in favour of torch.export, which cannot keep the axes dynamic;
            warnings.simplefilter("ignore")  # and the tracer's notes on the network's shape checks
            traced = torch.jit.trace(model, example, check_trace=False)
    script = folder / (TORCHSCRIPT_FILE + ".partial")
    traced.save(str(script))
    script.replace(folder / TORCHSCRIPT_FILE)
    out.files = {"onnx": onnx_path, "torchscript": folder / TORCHSCRIPT_FILE}
    card = dict(state.get("model_card") or {})
    exported = {"from": str(checkpoint), "onnx": {"file": ONNX_FILE, "opset": options.opset, "input": INPUT,
                                                   "output": OUTPUT, "sha256": _sha256(onnx_path)},
                "torchscript": {"file": TORCHSCRIPT_FILE}, "torch": torch.__version__,
                "onnxruntime": _need("onnxruntime").__version__}
    try:
        train_cache, valid_cache = _caches(trained, Path(options.cache) if options.cache else None)
    except DataError:
        if options.int8:
            raise
        train_cache = valid_cache = None
    if valid_cache is not None:  # what the forms agree on, and score, on the held-out slices
        images, reference = _slices(valid_cache, None)
        with torch.no_grad():
            torch_labels = labels_of(lambda x: model(torch.from_numpy(x)).numpy(), images)
        fp32 = onnx_session(onnx_path)
        onnx_labels = labels_of(lambda x: onnx_logits(fp32, x), images)
        exported["onnx"]["label_agreement"] = float((onnx_labels == torch_labels).mean())
        exported["onnx"]["dice"] = dice_per_class(onnx_labels, reference, classes)
        exported["scored_on"] = {"cache": str(valid_cache), "slices": len(images)}
        if options.int8:
            exported["int8"] = _int8(options, folder, onnx_path, train_cache, images, reference, classes, names,
                                     exported["onnx"]["dice"])
            out.files["int8"] = folder / INT8_FILE
    card["export"] = exported
    atomic_write(folder / EXPORT_CARD, json.dumps(card, indent=1, default=str) + "\n")
    out.files["card"] = folder / EXPORT_CARD
    out.card = card
    agreement = exported["onnx"].get("label_agreement")
    print(f"exported {checkpoint} -> {onnx_path} (opset {options.opset}), {folder / TORCHSCRIPT_FILE}, "
          f"{folder / EXPORT_CARD}" + (f"; ONNX and torch labels agree on {100 * agreement:.3f} % of "
                                     f"{len(images) * images[0, 0].size} held-out pixels" if agreement is not None else ""))
    return out


def _int8(options: ExportOptions, folder: Path, onnx_path: Path, train_cache: Path, images, reference, classes: int,
          names, fp32_dice: list[float]) -> dict:
    """Quantize, score on the held-out slices, and keep ``model.int8.onnx`` only if no class's Dice drops by more
    than the threshold."""
    import math

    from .training.ensemble import onnx_logits, onnx_session

    calibration, _ = _slices(train_cache, options.calibration_slices)
    target = folder / INT8_FILE
    trial = folder / (INT8_FILE + ".trial.onnx")
    start = time.perf_counter()
    try:
        quantize(onnx_path, trial, calibration)
        int8 = onnx_session(trial)
        int8_dice = dice_per_class(labels_of(lambda x: onnx_logits(int8, x), images), reference, classes)
        drops = [a - b if not (math.isnan(a) or math.isnan(b)) else 0.0 for a, b in zip(fp32_dice, int8_dice)]
        label = [names[k] if k < len(names) else f"class {k}" for k in range(classes)]
        figures = ", ".join(f"{label[k]} {fp32_dice[k]:.4f} -> {int8_dice[k]:.4f}" for k in range(classes))
        if max(drops) > options.max_dice_drop:
            worst = max(range(classes), key=lambda k: drops[k])
            raise DataError(onnx_path, f"the int8 model loses {drops[worst]:.4f} Dice on {label[worst]} (more than "
                            f"--max-dice-drop {options.max_dice_drop:g}) on {len(images)} held-out slices: {figures}",
                            "calibrate on more slices (--calibration-slices), accept a larger drop, or deploy the "
                            "fp32 model.onnx; no int8 model was written")
        trial.replace(target)
    finally:
        trial.unlink(missing_ok=True)
    print(f"int8: {target} (static QDQ, calibrated on {len(calibration)} slices of {train_cache} in "
          f"{time.perf_counter() - start:.1f} s); held-out Dice fp32 -> int8: {figures}", file=sys.stdout)
    return {"file": INT8_FILE, "sha256": _sha256(target), "calibration": {"cache": str(train_cache),
                                                                        "slices": len(calibration)},
            "dice": int8_dice, "max_dice_drop": options.max_dice_drop, "quantization": "static QDQ int8, per-channel "
            "weights, MinMax calibration (onnxruntime.quantization)"}


def cmd_export(args) -> int:
    from .core.cli_args import options_of

    export(options_of(ExportOptions, args))
    return 0


def add_commands(sub) -> None:
    """Add ``export`` to the ``autocnnp`` sub-parsers ``sub``."""
    from .core.cli_args import positive

    doc = ("write a checkpoint as ONNX and TorchScript with its model card (JSON); --int8 adds a statically quantized "
           "ONNX model, refused if its held-out Dice drops too far")
    s = sub.add_parser("export", help=doc, description=doc)
    s.add_argument("job", nargs="?", help="the XML job file of the run (optional: for latest/best)")
    s.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="the job variant that was trained (as `autocnnp run --set`)")
    s.add_argument("--checkpoint", default=ExportOptions.checkpoint,
                   help="latest (default) or best of the job's run, a checkpoint file or a run folder")
    s.add_argument("--to", default=None, help="the folder to write (default: export/ in the run's output folder)")
    s.add_argument("--int8", action="store_true", help="also write model.int8.onnx: static int8 quantization "
                   "calibrated on the run's training slices")
    s.add_argument("--cache", default=None, help="a slice cache to calibrate on and score instead of the run's caches")
    s.add_argument("--calibration-slices", type=positive, default=ExportOptions.calibration_slices,
                   help="training slices the int8 calibration reads")
    s.add_argument("--max-dice-drop", type=float, default=ExportOptions.max_dice_drop,
                   help="refuse the int8 model if the held-out Dice of any class drops by more than this")
    s.add_argument("--opset", type=positive, default=OPSET, help="the ONNX opset to write")
    s.set_defaults(func=cmd_export)
