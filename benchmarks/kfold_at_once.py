"""k-fold folds at once against one after another (``autocnnp study --at-once``): wall time, same machine.

    python benchmarks/kfold_at_once.py [--folds 5] [--ranks 2] [--epochs 1] [--cases 10]

Writes a small synthetic brain dataset (``--cases`` volumes of 32 x 32 x 12) and a tiny U-Net job of ``--ranks``
ranks (``oversubscribe``: the folds at once may hold more ranks than cores), then runs the same study twice in
fresh output folders: all ``--folds`` folds at once (independent MPI groups) and one fold at a time. Each fold
pays the start of its ranks (interpreters, torch, MPI) and the data checks and caches once; at once those costs
overlap with the other folds' training. The gain is bounded by the cores: on a machine with at least
folds x ranks free cores the folds-at-once time approaches one fold's. Figures, not asserts.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main(argv: list[str] | None = None) -> int:
    from jobfiles import QUIET, TINY_UNET, write_job

    from autocnnp.core.processes import usable_cores
    from autocnnp.data.synth import write_synthetic_dataset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--cases", type=int, default=10)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_dataset(root / "data", "brain", cases=args.cases, shape=(32, 32, 12), seed=0)
        data = ('<data format="decathlon"><train><path>data</path></train><param name="slices_per_volume">6</param>'
                f'<param name="size">32</param><param name="folds">{args.folds}</param></data>')
        write_job(root / "job.xml", degree=args.ranks, output="out", arch=TINY_UNET, data=data,
                  extra=QUIET,
                  hyper={"end_epoch": args.epochs, "minibatch_size": 4})
        times = {}
        for label, at_once in (("at once", args.folds), ("one after another", 1)):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "autocnnp", "study", "job.xml", "--at-once", str(at_once),
                                   "--set", f"output=out-{at_once}", "--set", "cluster.oversubscribe=true"],
                                  cwd=root, capture_output=True, text=True)
            times[label] = time.perf_counter() - start
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-2000:])
                return done.returncode
            print(f"{args.folds} folds x {args.ranks} ranks, {label}: {times[label]:.1f} s", flush=True)
    print(f"on {usable_cores()} cores: at once {times['at once']:.1f} s, one after another "
          f"{times['one after another']:.1f} s ({times['one after another'] / times['at once']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
