"""Inference speed of ``autocnnp predict``: ms per slice and per volume, beside the thesis' 153 / 182 ms per image.

    python benchmarks/inference_speed.py [--models unet,fcn] [--size 512] [--batch-sizes 1,8] [--slices 130]
    python benchmarks/inference_speed.py --device cuda --precision bf16 --channels-last   # on a GPU
    python benchmarks/inference_speed.py --volume 512,512,300 [--volume-size 128] [--compare /work/main]

What is timed is ``autocnnp.training.predictor.slice_probabilities``, the function predict runs on every volume: the
batch's copy to the device (from pinned host memory, asynchronous, on a GPU), the forward pass (under autocast
when a precision is given), the softmax and the copy back into the volume's preallocated probability array, on
random slices of 1 channel and 2 classes (the thesis' left-atrium task). Loading, resampling and writing
NIfTI files are left out. ms per slice is a call's time over its batch size; ms per volume is
ceil(slices / batch size) calls, a volume of ``--slices`` slices.

Models (``components/architectures``): ``unet`` and ``fcn`` are the built-in components with their default
parameters (U-Net: 4 levels, 32 base channels, batch norm; FCN-8s on a full-width VGG16); ``unet-thesis`` is
the U-Net of the thesis' Figure 2.15, Ronneberger et al.'s (5 levels, 64 base channels, no normalisation:
the thesis does not give its implementation's widths, so this is an assumption). On a CPU the default leaves
``unet-thesis`` out (about 3 s per 512 x 512 slice on one core).

Variants, measured side by side, alternated within every round, medians over the rounds:

* CPU: fp32 with 1 thread and with all the cores this process may use (its CPU affinity, predict's default);
  ``--precision bf16`` / ``--channels-last`` add a third with those on all cores;
* GPU (``--device cuda``): fp32, the ``--precision`` autocast (auto: bf16, fp16 where the GPU has none), and
  that in channels_last (on by default on a GPU, as in predict; ``--no-channels-last`` leaves it out).

``--volume X,Y,Z`` times the whole of ``autocnnp predict`` instead, as a subprocess, on one synthetic CT-like
int16 volume of that shape (a noisy body ellipsoid in air, 0.8 x 0.8 x 1.5 mm, ``.nii.gz``) with an untrained
checkpoint of the first of ``--models`` (a U-Net) at ``--volume-size``: its wall time and peak resident memory,
the network's seconds (from predict's per-volume line) and the rest (reading, preparing the slices, resizing the
probabilities back, writing); ``--compare PATH`` runs the same with ``PYTHONPATH=PATH`` (the code before a change,
say) in the same run. The goal: the rest costs less than the network.

Each (model, variant) runs once before the rounds (on a GPU once per batch size: cuDNN tunes per shape); a
measurement repeats the call until ``--min-time`` seconds have passed. The thesis (section 3.4.2) measured
153 ms (Dist-U-Net) and 182 ms (Dist-FCN) per 512 x 512 image on a GTX 1080 Ti (TensorFlow, mean of 10 runs);
the goal on a GPU is <= 5 ms per 512 x 512 slice for U-Net. Figures, not asserts.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, measured, table  # noqa: E402

from autocnnp.core.processes import usable_cores  # noqa: E402
from autocnnp.inference import PRECISIONS  # noqa: E402
from autocnnp.training.precision import autocast_dtype  # noqa: E402
from autocnnp.training.predictor import prepare_network, slice_probabilities  # noqa: E402

THESIS_MS = {"unet": 153, "fcn": 182}  # per 512 x 512 image, GTX 1080 Ti
GPU_GOAL_MS = 5.0  # per 512 x 512 slice, U-Net
MODELS = {  # name -> (architecture file, parameters)
    "unet": ("unet", {}),
    "unet-thesis": ("unet", {"depth": 5, "base_channels": 64, "norm": "none"}),
    "fcn": ("fcn", {}),
}


@dataclass(frozen=True)
class Variant:
    """How the network runs: CPU threads, autocast dtype (None: float32), memory format."""

    threads: int
    dtype: object
    channels_last: bool

    def label(self, cuda: bool) -> str:
        arithmetic = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(self.dtype), "fp32")
        where = "" if cuda else f", {self.threads} thread{'s' if self.threads > 1 else ''}"
        return f"{arithmetic}{', channels_last' if self.channels_last else ''}{where}"


def variants(device, precision: str, channels_last: bool | None) -> list[Variant]:
    """The variants a run compares (see the module's docstring)."""
    cores, dtype = usable_cores(), autocast_dtype(precision, device)
    if device.type == "cuda":
        found = [Variant(cores, None, False)]
        if dtype is not None:
            found.append(Variant(cores, dtype, False))
        if channels_last is not False:
            found.append(Variant(cores, dtype, True))
        return list(dict.fromkeys(found))
    found = [Variant(1, None, False), Variant(cores, None, False)]
    if dtype is not None or channels_last:
        found.append(Variant(cores, dtype, bool(channels_last)))
    return list(dict.fromkeys(found))


def build(name: str, device, channels_last: bool):
    import importlib

    file, params = MODELS[name]
    module = importlib.import_module(f"autocnnp.components.architectures.{file}")
    return prepare_network(module.build(module.Config(**params), in_channels=1, num_classes=2), device, channels_last)


def seconds_per_call(model, slices, device, variant: Variant, min_time: float) -> float:
    """Mean seconds of ``slice_probabilities`` on ``slices`` (one batch), repeated for ``min_time`` seconds."""
    import torch

    torch.set_num_threads(variant.threads)
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < min_time:
        slice_probabilities(model, slices, len(slices), device, False, variant.dtype, variant.channels_last)
        calls += 1
    return (time.perf_counter() - start) / calls


def names(text: str) -> list[str]:
    found = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in found if n not in MODELS]
    if unknown or not found:
        raise argparse.ArgumentTypeError(f"models are {', '.join(MODELS)}, not {text!r}")
    return found


def sizes(text: str) -> list[int]:
    try:
        found = sorted({int(n) for n in text.split(",")})
    except ValueError:
        found = []
    if not found or found[0] < 1:
        raise argparse.ArgumentTypeError(f"batch sizes are positive integers separated by commas, not {text!r}")
    return found


def write_volume_case(folder: Path, shape: tuple[int, ...], model: str, size: int, classes: int) -> tuple[Path, Path]:
    """``(image, checkpoint)``: a CT-like int16 volume of ``shape`` and an untrained checkpoint of ``model`` (a
    U-Net of ``MODELS``) of ``classes`` classes with its model card, trained (as it were) at ``size`` on a small
    synthetic dataset."""
    import types

    import nibabel as nib
    import numpy as np
    import torch

    from autocnnp.data.synth import write_synthetic_dataset
    from autocnnp.generator.assemble import assemble
    from autocnnp.generator.overrides import parse_sets, read_variant
    from autocnnp.training.loop import model_card

    file, params = MODELS[model]
    if file != "unet":
        raise SystemExit(f"--volume: the model is a U-Net ({', '.join(m for m in MODELS if MODELS[m][0] == 'unet')})")
    write_synthetic_dataset(folder / "data", "atrium", cases=1, shape=(32, 32, 6), seed=0, test_cases=0)
    sets = [f"data.train={folder / 'data'}", "data.modalities=all", f"data.size={size}", f"output={folder / 'run'}",
            *(f"architecture.{k}={v}" for k, v in params.items())]
    gen = assemble(read_variant(ROOT / "xml_configs" / "brain_tumour_unet.xml", parse_sets(sets)))
    torch.manual_seed(0)
    net = gen.action("architecture_injection").build(in_channels=1, num_classes=classes)
    bundle = types.SimpleNamespace(in_channels=1, num_classes=classes,
                                   class_names=("background", *(f"organ {k}" for k in range(1, classes))))
    torch.save({"model": net.state_dict(), "model_card": model_card(gen, bundle)}, folder / "model.pt")
    rng = np.random.default_rng(0)
    x, y = np.ogrid[:shape[0], :shape[1]]
    body = ((x - shape[0] / 2) / (0.43 * shape[0])) ** 2 + ((y - shape[1] / 2) / (0.35 * shape[1])) ** 2 <= 1
    volume = np.full(shape, -1000, np.int16, order="F")
    for z in range(shape[2]):
        volume[:, :, z][body] = rng.normal(40, 20, int(body.sum()))
    (folder / "images").mkdir()
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 1.5, 1.0])), folder / "images" / "ct_000.nii.gz")
    return folder / "images" / "ct_000.nii.gz", folder / "model.pt"


def predict_volume(args) -> int:
    """``--volume``: the whole of predict on one volume, this checkout and ``--compare`` (module docstring)."""
    import re
    import tempfile

    shape = tuple(int(s) for s in args.volume.split(","))
    model = (args.models or ["unet"])[0]
    variants = {"this checkout": str(ROOT)}
    if args.compare:
        variants = {args.compare: str(Path(args.compare).resolve()), **variants}
    with tempfile.TemporaryDirectory(prefix="autocnnp-predict-bench-") as tmp:
        folder = Path(tmp)
        image, checkpoint = write_volume_case(folder, shape, model, args.volume_size, args.classes)
        print(f"predict: one {' x '.join(map(str, shape))} int16 volume ({image.stat().st_size / 1e6:.0f} MB as "
              f".nii.gz), untrained {model} at {args.volume_size} x {args.volume_size}, {args.classes} classes"
              f"{', --probabilities' if args.probabilities else ''}, on the CPU "
              f"({usable_cores()} usable core(s)), load {os.getloadavg()[0]:.2f} before")
        rows = []
        for r in range(args.rounds or 1):
            for label, path in variants.items():  # alternated: A B A B
                out = folder / f"pred-{r}-{len(rows)}"
                cmd = [sys.executable, "-m", "autocnnp", "predict", "--checkpoint", str(checkpoint), "--input",
                       str(image), "--out", str(out), *(["--probabilities"] if args.probabilities else [])]
                seconds, peak, rc, text = measured(cmd, path, folder)
                found = re.search(r"(\d+) slices, inference ([\d.]+) ms/slice", text)
                if rc or not found:
                    print(text, file=sys.stderr)
                    return 1
                network = int(found[1]) * float(found[2]) / 1000
                rows.append((label, f"{seconds:.1f}", f"{network:.1f}", f"{seconds - network:.1f}",
                             f"{peak / 2**20:.0f}"))
                print(f"  {label}: {text.splitlines()[1].strip()}", file=sys.stderr)
        print(table(("code", "wall s", "network s", "the rest s", "peak RSS MiB"), rows))
        print(f"load {os.getloadavg()[0]:.2f} after; the rest: process start, checkpoint, reading, preparing the "
              "slices, resizing back, writing; goal: the rest under the network")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=names, default=None,
                    help=f"comma-separated, of {', '.join(MODELS)} (default: unet,fcn on a CPU, all on a GPU)")
    ap.add_argument("--size", type=int, default=512, help="slice side in pixels (default 512, as the thesis)")
    ap.add_argument("--batch-sizes", type=sizes, default=[1, 8], help="slices per call (default 1,8)")
    ap.add_argument("--slices", type=int, default=130, help="slices of the volume its ms are given for (default 130)")
    ap.add_argument("--rounds", type=int, default=None, help="alternated rounds (default 3 on a CPU, 10 on a GPU)")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds each measurement repeats its call for")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="autocast of the variant measured beside fp32 (auto: bf16 on a GPU, none on a CPU)")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="also measure channels_last (default: on a GPU)")
    ap.add_argument("--volume", default=None, metavar="X,Y,Z",
                    help="time the whole of predict on one synthetic volume of this shape instead (module docstring)")
    ap.add_argument("--volume-size", type=int, default=128, help="--volume: the model's slice size (default 128)")
    ap.add_argument("--classes", type=int, default=2, help="--volume: the model's classes (default 2)")
    ap.add_argument("--probabilities", action="store_true", help="--volume: predict --probabilities")
    ap.add_argument("--compare", default=None, help="--volume: also run predict from this checkout (PYTHONPATH)")
    args = ap.parse_args(argv)
    if args.volume:
        return predict_volume(args)

    import numpy as np
    import torch

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here")
    if cuda:
        torch.backends.cudnn.benchmark = True  # as predict
    models = args.models or (list(MODELS) if cuda else ["unet", "fcn"])
    rounds = args.rounds or (10 if cuda else 3)
    runs = variants(device, args.precision, args.channels_last)
    batches = args.batch_sizes
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 1, args.size, args.size), dtype=np.float32) for b in batches}
    where = torch.cuda.get_device_name(device) if cuda else \
        f"{platform.processor() or platform.machine()}, {usable_cores()} usable core(s), load {os.getloadavg()[0]:.2f}"
    print(f"inference speed: {args.size} x {args.size} slices, 1 channel, 2 classes, on {device} ({where}); "
          f"torch {torch.__version__}; {rounds} rounds, medians")

    torch.manual_seed(0)
    networks = {(m, layout): build(m, device, layout) for m in models for layout in {v.channels_last for v in runs}}
    for m in models:  # warm-up: allocations, cuDNN's choice of algorithms
        for v in runs:
            for b in batches if cuda else batches[:1]:
                seconds_per_call(networks[m, v.channels_last], inputs[b], device, v, 0)
    seconds: dict[tuple, list[float]] = {}
    for r in range(rounds):
        for m in models:
            for b in batches:
                for v in runs:  # alternated: A B A B
                    seconds.setdefault((m, b, v), []).append(
                        seconds_per_call(networks[m, v.channels_last], inputs[b], device, v, args.min_time))
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)

    rows = []
    for (m, b, v), values in seconds.items():
        per_call = statistics.median(values)
        rows.append((m, v.label(cuda), str(b), f"{1000 * per_call / b:.2f}",
                     f"{1000 * per_call * math.ceil(args.slices / b):.0f}",
                     " ".join(f"{1000 * s / b:.1f}" for s in values),
                     str(THESIS_MS.get(MODELS[m][0], ""))))
    print(table(("model", "variant", "batch", "ms/slice", f"ms/volume ({args.slices})", "ms/slice by round",
                 "thesis ms/image"), rows))
    print(f"thesis: {THESIS_MS['unet']} ms (U-Net) and {THESIS_MS['fcn']} ms (FCN) per 512 x 512 image on a "
          f"GTX 1080 Ti; goal on a GPU: <= {GPU_GOAL_MS:g} ms per 512 x 512 slice for U-Net")
    return 0


if __name__ == "__main__":
    sys.exit(main())
