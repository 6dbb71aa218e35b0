"""3D against 2D on structures only 3D can tell apart: held-out whole-volume Dice of each class.

    python benchmarks/fidelity_3d.py [--seeds 0,1] [--cases 8] [--valid-cases 4] [--epochs-2d 6] [--epochs-3d 6]

Writes a ``synth --kind tubes`` dataset (1 x 1 x 3 mm; spheres, label 1, and tubes along z, label 2, of one radius
and intensity: every axial slice through either shows the same disc) and a held-out one (other seeds), then trains
with ``autocnnp run`` (1 rank, CPU) a 2D U-Net on every axial slice (``dimension=2d``) and a 3D U-Net on patches
(``dimension=3d``) of the same depth and width, each validated on the held-out volumes as whole volumes (2D: every
slice; 3D: a sliding window). Prints, per seed and dimension, the wall time and the last epoch's held-out Dice of
spheres, tubes and the foreground. Set the epochs so that the wall times are alike (the same budget).
Figures, not asserts: exits 0.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, table  # noqa: E402

JOB = """<?xml version="1.0" encoding="UTF-8"?>
<system_config><task name="imaging_segmentation">
  <parallelism-degree>1</parallelism-degree><seed>{seed}</seed><output><path>{out}</path></output>
  <CNN_archi name="{arch}"><param name="depth">3</param><param name="base_channels">8</param>
    <param name="norm">instance</param></CNN_archi>
  <CNN-Parallelism-Generator><module name="train_strategy_def">
    <action class="extensible" type="dist_strategy"><value>ring_allreduce</value></action>
    <action class="extensible" type="lr_policy"><value>constant</value></action>
  </module></CNN-Parallelism-Generator>
  <data format="decathlon"><train><path>{train}</path></train><valid><path>{valid}</path></valid>{data}</data>
  <monitoring><property name="tensorboard">false</property><property name="plots">false</property>
    <property name="progress">false</property></monitoring>
  <hyperparameters><property name="lr">0.003</property><property name="optimiser">adam</property>
    <property name="loss">dice_ce</property><property name="minibatch_size">{batch}</property>
    <property name="start_epoch">0</property><property name="end_epoch">{epochs}</property></hyperparameters>
</task></system_config>
"""
DATA = {"2d": '<param name="dimension">2d</param><param name="slices_per_volume">0</param><param name="size">{side}</param>',
        "3d": '<param name="dimension">3d</param><param name="patch_size">16,{side},{side}</param>'
              '<param name="patches_per_volume">8</param>'}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--valid-cases", type=int, default=4)
    ap.add_argument("--side", type=int, default=32, help="X and Y of the volumes (Z is 16)")
    ap.add_argument("--epochs-2d", type=int, default=6)
    ap.add_argument("--epochs-3d", type=int, default=6)
    args = ap.parse_args()

    from autocnnp.data.synth import write_synthetic_dataset

    rows, fg = [], {"2d": [], "3d": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            shape = (args.side, args.side, 16)
            train = write_synthetic_dataset(Path(tmp) / f"train{seed}", "tubes", cases=args.cases, shape=shape,
                                            seed=seed, test_cases=0)
            valid = write_synthetic_dataset(Path(tmp) / f"valid{seed}", "tubes", cases=args.valid_cases, shape=shape,
                                            seed=1000 + seed, test_cases=0)
            for dims in ("2d", "3d"):
                out = Path(tmp) / f"out-{dims}-{seed}"
                job = Path(tmp) / f"job-{dims}-{seed}.xml"
                job.write_text(JOB.format(seed=seed, out=out, arch="unet" if dims == "2d" else "unet3d", train=train,
                                          valid=valid, data=DATA[dims].format(side=args.side),
                                          batch=8 if dims == "2d" else 2,
                                          epochs=args.epochs_2d if dims == "2d" else args.epochs_3d))
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "autocnnp", "run", str(job)], cwd=ROOT,
                                      capture_output=True, text=True)
                took = time.perf_counter() - start
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    return 1
                with open(out / "metrics.csv") as f:
                    last = list(csv.DictReader(f))[-1]
                fg[dims].append(float(last["dice_fg"]))
                rows.append([str(seed), dims, last["epoch"], f"{took:.0f}", f"{float(last['dice/sphere']):.3f}",
                             f"{float(last['dice/tube']):.3f}", f"{float(last['dice_fg']):.3f}"])
    print(table(["seed", "model", "epochs", "wall s", "Dice sphere", "Dice tube", "Dice fg"], rows))
    print(f"median held-out foreground Dice: 2D {statistics.median(fg['2d']):.3f}, 3D {statistics.median(fg['3d']):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
