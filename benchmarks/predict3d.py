"""3D predict: seconds per 240 x 240 x 155 volume (BraTS-sized, 4 channels) on the CPU with 1 and 2 threads and
across 2 ranks (``predict --ranks 2``, one thread each), and the peak memory of predicting one 512 x 512 x 300
volume (issue 22's bound: 4 GB). With ``--vs-precision --device cuda`` (benchmarks/gpu_suite.sh): seconds per
volume on the device in fp32 and in ``--precision`` (bf16 by default), and their ratio, in the same run.

    python benchmarks/predict3d.py [--base-channels 8] [--depth 4] [--patch 64,128,128] [--overlap 0.5]
                                   [--shape 240,240,155] [--vs-precision --device cuda --precision bf16]

Each figure is one ``autocnnp predict`` process (``python -m autocnnp predict``, the command a user runs) of an
untrained ``unet3d`` (speed and memory do not depend on the weights) whose checkpoint describes a 3D model at 1 mm
spacing, so the volumes (1 mm voxels, int16 as stored) are not resampled: the sliding window (Gaussian weights,
windows one at a time on the CPU) and the trip back to the source grid are what is timed. Seconds per volume are
the process's wall time (start-up, reading, pre-processing, network, writing) divided by the volumes; the
network's share is predict's own report. Peak memory is wait4's ru_maxrss of the predict process; the large
volume runs with ``--memory-overlap`` (default 0: fewer windows, the same arrays) to keep the benchmark short.
Figures, not asserts: exits 0.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _bench import ROOT, measured, table  # noqa: E402

BOUND_GB = 4.0


def checkpoint(folder: Path, args, channels: int, overlap: float) -> Path:
    """An untrained unet3d's checkpoint whose card describes 1 mm volumes, ``args.patch`` windows and ``overlap``."""
    from autocnnp.data.synth import affine_for, write_synthetic_dataset
    from autocnnp.generator.assemble import assemble
    from autocnnp.training.loop import model_card

    sys.path.insert(0, str(ROOT / "tests"))
    from jobfiles import QUIET, write_job

    write_synthetic_dataset(folder / "train", "tubes", cases=2, shape=(32, 32, 16), test_cases=0,
                            affine=affine_for((32, 32, 16), (1.0, 1.0, 1.0)))
    arch = (f'<CNN_archi name="unet3d"><param name="depth">{args.depth}</param>'
            f'<param name="base_channels">{args.base_channels}</param></CNN_archi>')
    data = (f'<data format="decathlon"><train><path>train</path></train><param name="dimension">3d</param>'
            f'<param name="patch_size">{args.patch}</param><param name="spacing">1,1,1</param>'
            f'<param name="valid_overlap">{overlap}</param></data>')
    gen = assemble(write_job(folder / f"job{channels}.xml", arch=arch, data=data, extra=QUIET))
    torch.manual_seed(0)
    net = gen.action("architecture_injection").build(in_channels=channels, num_classes=4)
    card = model_card(gen, types.SimpleNamespace(in_channels=channels, num_classes=4, class_names=()))
    path = folder / f"unet3d-{channels}ch-overlap{overlap}.pt"
    torch.save({"model": net.state_dict(), "model_card": card}, path)
    return path


def volumes(folder: Path, shape: tuple[int, ...], count: int) -> Path:
    """``count`` random int16 volumes of ``shape`` (X, Y, Z[, C]) with 1 mm voxels, as uncompressed NIfTI."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        image = rng.integers(0, 1000, size=shape, dtype=np.int16)
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"case_{i:03d}.nii")
    return folder


def predict(ck: Path, source: Path, out: Path, *extra: str) -> tuple[float, int, float, str]:
    """``(wall seconds, peak bytes, network seconds, output)`` of one predict process."""
    cmd = [sys.executable, "-m", "autocnnp", "predict", "--checkpoint", str(ck), "--input", str(source),
           "--out", str(out), *extra]
    seconds, peak, code, text = measured(cmd, str(ROOT), ROOT)
    if code != 0:
        raise SystemExit(f"predict failed ({code}):\n{text[-3000:]}")
    network = sum(float(s) for s in re.findall(r"network ([\d.]+) s", text))
    return seconds, peak, network, text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-channels", type=int, default=8)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--patch", default="64,128,128", help="window D,H,W (D along the volume's third axis)")
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--memory-shape", default="512,512,300")
    ap.add_argument("--memory-overlap", type=float, default=0.0)
    ap.add_argument("--shape", default="240,240,155", help="the speed volumes' X,Y,Z (4 channels)")
    ap.add_argument("--vs-precision", action="store_true", help="fp32 against --precision on --device, instead "
                    "of 1 thread, 2 threads and 2 ranks on the CPU")
    ap.add_argument("--device", default="cpu", help="with --vs-precision: the torch device")
    ap.add_argument("--precision", default="bf16", help="with --vs-precision: the precision set against fp32")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="predict3d-") as tmp:
        folder = Path(tmp)
        rows = []
        if not args.skip_speed:
            ck = checkpoint(folder, args, 4, args.overlap)
            shape = tuple(int(s) for s in args.shape.split(","))
            brats = volumes(folder / "brats", (*shape, 4), 2)
            runs = ((("1 thread", ("--threads", "1"), 1), ("2 threads", ("--threads", "2"), 1),
                     ("2 ranks x 1 thread", ("--threads", "1", "--ranks", "2"), 2)) if not args.vs_precision else
                    ((f"{args.device} {p}", ("--device", args.device, "--precision", p), 1)
                     for p in ("fp32", args.precision)))
            per_volume = []
            for name, extra, count in runs:
                source = brats / "case_000.nii" if count == 1 else brats
                seconds, peak, network, _ = predict(ck, source, folder / name.replace(" ", "_"), *extra)
                per_volume.append((seconds / count, network / count))
                rows.append((f"{'x'.join(map(str, shape))}x4, {name}", f"{seconds / count:.1f}",
                             f"{network / count:.1f}" if network else "-", f"{peak / 2**30:.2f}"))
        if not args.skip_memory:
            shape = tuple(int(s) for s in args.memory_shape.split(","))
            ck = checkpoint(folder, args, 1, args.memory_overlap)
            big = volumes(folder / "big", shape, 1) / "case_000.nii"
            seconds, peak, network, _ = predict(ck, big, folder / "big_out", "--threads", "2")
            rows.append((f"{'x'.join(map(str, shape))}x1, 2 threads (overlap {args.memory_overlap:g})",
                         f"{seconds:.1f}", f"{network:.1f}", f"{peak / 2**30:.2f}"))
        print(f"unet3d depth {args.depth}, {args.base_channels} base channels, windows {args.patch}, overlap "
              f"{args.overlap:g}, 4 classes, {args.device if args.vs_precision else 'CPU'} "
              f"({torch.get_num_threads()} cores seen)")
        print(table(("volume, processes", "s/volume", "network s/volume", "peak GiB (one process)"), rows))
        if args.vs_precision and not args.skip_speed:
            (whole, net), (whole_p, net_p) = per_volume
            print(f"s per volume {args.precision} / fp32: {whole_p / whole:.2f} (the process), "
                  f"{net_p / net:.2f} (the network)" if net else f"s per volume {args.precision} / fp32: "
                  f"{whole_p / whole:.2f} (the process)")
        if not args.skip_memory:
            print(f"memory bound: {'met' if peak / 2**30 <= BOUND_GB else 'NOT met'} "
                  f"({peak / 2**30:.2f} GiB of {BOUND_GB:g} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
