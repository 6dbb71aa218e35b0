"""int8 against fp32 inference on this CPU (``autocnnp export --int8``), as the federated glioblastoma study
measured its consensus model (4.48x lower latency, 2.29x less memory, insignificant Dice drop).

    python benchmarks/int8_inference.py [--models unet,fcn] [--size 512] [--train-size 96] [--steps 60]

Each model (the built-in components with their default parameters, 1 channel, 3 classes) is trained for
``--steps`` Adam steps on synthetic brain slices (``SyntheticSliceDataset``, ``--train-size``: the networks are
fully convolutional, so the same weights run at ``--size``), exported with :func:`autocnnp.export.export_onnx`
and quantized with :func:`autocnnp.export.quantize` (static QDQ int8, calibrated on 32 training slices). Then,
each variant (torch fp32, ONNX Runtime fp32, ONNX Runtime int8) in a fresh process on all usable cores:

* latency: the median ms per ``--size`` x ``--size`` slice at batch 1 (the study's measure);
* throughput: slices per second at batch 8;
* peak memory: the process's peak resident set over its resident set before loading the model (the model and
  its activations);
* held-out Dice per class: 64 unseen slices at ``--train-size``, fp32 and int8 labels against the truth.

The goal (issue 25): at least a 2x lower latency for int8 than fp32 with |delta Dice| <= 0.01 per class.
Figures, not asserts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CLASSES = 3


def network(name: str):
    """The built-in architecture ``name`` (inference_speed.MODELS), 1 channel in, CLASSES out."""
    import importlib

    from inference_speed import MODELS

    file, params = MODELS[name]
    module = importlib.import_module(f"autocnnp.components.architectures.{file}")
    return module.build(module.Config(**params), in_channels=1, num_classes=CLASSES)


def train(name: str, size: int, steps: int):
    """The built-in architecture ``name`` (inference_speed.MODELS) trained ``steps`` Adam steps on synthetic slices."""
    import torch

    from autocnnp.data.synthetic_slices import SyntheticSliceDataset

    torch.manual_seed(0)
    model = network(name).train()
    data = SyntheticSliceDataset("brain", 8 * steps, size, 1, CLASSES, seed=1, in_memory=False)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(steps):
        images, labels = data.read_batch(np.arange(8 * step, 8 * step + 8))
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval(), data


def measure(kind: str, path: str, size: int, rounds: int) -> dict:
    """In a fresh process: latency (batch 1), throughput (batch 8) and peak memory of one variant."""
    import psutil
    import torch

    before = psutil.Process().memory_info().rss / 1024  # KiB, as ru_maxrss
    if kind == "torch":
        model = network(Path(path).parent.name)
        model.load_state_dict(torch.load(path))
        model.eval()

        def run(x):
            with torch.no_grad():
                return model(torch.from_numpy(x)).numpy()
    else:
        from autocnnp.training.ensemble import onnx_logits, onnx_session

        sess = onnx_session(Path(path))

        def run(x):
            return onnx_logits(sess, x)
    one = np.random.default_rng(0).standard_normal((1, 1, size, size)).astype(np.float32)
    eight = np.repeat(one, 8, axis=0)
    run(one)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run(one)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    run(eight)
    throughput = 8 / (time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"ms": 1000 * statistics.median(times), "throughput": throughput, "peak_mb": (peak - before) / 1024}


def in_fresh_process(*args) -> dict:
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


def main(argv: list[str] | None = None) -> int:
    import torch

    from autocnnp.export import dice_per_class, export_onnx, labels_of, quantize
    from autocnnp.training.ensemble import onnx_logits, onnx_session

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="unet,fcn")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--train-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    print(f"int8 vs fp32 on {torch.get_num_threads()} thread(s); latency at batch 1 and throughput at batch 8 on "
          f"{args.size} x {args.size}; Dice on 64 held-out {args.train_size} x {args.train_size} slices")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            start = time.perf_counter()
            model, data = train(name, args.train_size, args.steps)
            folder = Path(tmp) / name
            folder.mkdir()
            example = torch.zeros((1, 1, args.train_size, args.train_size))
            with torch.no_grad():
                export_onnx(model, example, folder / "model.onnx", 17, folder)
                torch.save(model.state_dict(), folder / "model.pt")  # run eagerly, as predict runs it
            calibration, _ = data.read_batch(np.arange(0, 32))
            quantize(folder / "model.onnx", folder / "model.int8.onnx", calibration.numpy())
            held_out = type(data)("brain", 64, args.train_size, 1, CLASSES, seed=99, in_memory=False)
            images, truth = (t.numpy() for t in held_out.read_batch(np.arange(64)))
            dice = {}
            for label, file in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
                sess = onnx_session(folder / file)
                dice[label] = dice_per_class(labels_of(lambda x, s=sess: onnx_logits(s, x), images), truth, CLASSES)
            print(f"{name}: trained {args.steps} steps, exported and quantized in {time.perf_counter() - start:.0f} s; "
                  f"Dice fp32 {[round(d, 4) for d in dice['fp32']]}, int8 {[round(d, 4) for d in dice['int8']]}",
                  flush=True)
            figures = {label: in_fresh_process(kind, str(folder / file), args.size, args.rounds)
                       for label, kind, file in (("torch fp32", "torch", "model.pt"), ("ORT fp32", "onnx", "model.onnx"),
                                                 ("ORT int8", "onnx", "model.int8.onnx"))}
            for label, f in figures.items():
                rows.append((name, label, f"{f['ms']:.1f}", f"{f['throughput']:.2f}", f"{f['peak_mb']:.0f}"))
            fp32, int8 = figures["torch fp32"], figures["ORT int8"]
            drop = max(abs(a - b) for a, b in zip(dice["fp32"], dice["int8"]))
            print(f"{name}: int8 latency {fp32['ms'] / int8['ms']:.2f}x lower than torch fp32 "
                  f"({figures['ORT fp32']['ms'] / int8['ms']:.2f}x than ORT fp32), memory "
                  f"{fp32['peak_mb'] / max(int8['peak_mb'], 1):.2f}x less, max |delta Dice| {drop:.4f}", flush=True)
    from _bench import table

    print(table(("model", "variant", "ms/slice (batch 1)", "slices/s (batch 8)", "peak MB"), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
