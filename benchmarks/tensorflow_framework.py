"""The tensorflow framework against a hand-written MultiWorkerMirroredStrategy loop, and torch against
tensorflow on the same job, side by side in one run.

    python benchmarks/tensorflow_framework.py [--ranks 2] [--rounds 3] [--steps 30] [--epochs 3] [--baseline DIR]

1. Step throughput (samples/s over the ranks): ``--ranks`` ranks (mpirun; the script re-launches itself)
   build the demo job's run through the tensorflow framework (keras_trainer.build: the MWMS strategy, the
   data pipeline, the Keras U-Net; one thread per rank) and a hand-written loop on the same strategy. The
   hand-written loop includes what any MWMS loop on this data needs and nothing of the framework's: its own
   Keras U-Net of the same architecture and Adam, built in ``strategy.scope()``; its batches read through the
   same data pipeline (``run.loader``: sharded, augmented, converted to NHWC arrays); a ``tf.function`` of
   ``strategy.run`` of a replica step (the job's dice_ce loss over the global batch, ``apply_gradients``);
   this rank's loss read every step. It leaves out the LR policy's per-step assignment, the loss guard and
   the monitor. The two alternate, ``--steps`` timed steps each round, ``--rounds`` rounds: each round's ratio
   and their median, from wall time and from rank 0's CPU time (which other load on a shared machine
   disturbs less). Goal: framework / hand-written >= 0.95.
2. The demo job (xml_configs/demo.xml, ``--epochs`` epochs) run by ``autocnnp run`` with framework torch and
   tensorflow, alternated: samples/s of the first epoch (the train step's tracing) and of the later ones
   (metrics.csv), final foreground Dice. ``--baseline DIR`` (another checkout, e.g. ``git archive main``
   unpacked) runs its tensorflow job alternated with this checkout's: the first epoch's samples/s before/after.

Figures, not asserts: exits 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, ranks_result, table  # noqa: E402

DEMO = ROOT / "xml_configs" / "demo.xml"


def worker(args) -> None:
    """One rank of part 1: alternate the framework's steps and the hand-written loop's."""
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras
    import numpy as np
    import tensorflow as tf

    from autocnnp.engine.job import read_job
    from autocnnp.generator.assemble import assemble
    from autocnnp.generator.overrides import apply_overrides
    from autocnnp.training import keras_losses, keras_trainer
    from autocnnp.training.monitor import MonitoringConfig

    gen = assemble(apply_overrides(read_job(DEMO), {"framework": "tensorflow",
                                                    **dict(kv.split("=", 1) for kv in args.set)}))
    gen.rundir = type(gen.rundir)(Path(args.worker) / "run")
    run = keras_trainer.build(gen, MonitoringConfig(), timeout_s=300)
    strategy, batch = run.strategy.distribution, run.hp.minibatch_size
    with strategy.scope():  # the hand-written side: its own network of the same architecture and optimizer
        net = gen.action("architecture_injection").build(in_channels=run.data.in_channels,
                                                         num_classes=run.data.num_classes)
        opt = keras.optimizers.Adam(learning_rate=run.hp.lr, epsilon=1e-8)
        opt.build(net.trainable_variables)
    global_batch = batch * strategy.num_replicas_in_sync
    loss_fn, num_classes = keras_losses.get_loss(run.hp.loss), run.data.num_classes

    def replica(x, y):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(loss_fn(net(x, training=True), y, num_classes),
                                              global_batch_size=global_batch)
        opt.apply_gradients(zip(tape.gradient(loss, net.trainable_variables), net.trainable_variables))
        return loss

    @tf.function
    def hand_step(x, y):
        return strategy.experimental_local_results(strategy.run(replica, args=(x, y)))[0]

    def batches(n: int):
        """``n`` of this rank's minibatches, from the data pipeline, epoch after epoch."""
        done = 0
        while True:
            run.loader.set_epoch(done)
            for x, y in run.loader:
                yield x, y
                done += 1
                if done == n:
                    return

    def framework_steps(n: int) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        for step, (x, y) in enumerate(batches(n)):
            run.steps.step(x, y, run.policy.lr(0, step % len(run.loader)))
        return time.perf_counter() - start, time.process_time() - cpu

    def hand_steps(n: int) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        for x, y in batches(n):
            float(hand_step(keras_trainer.nhwc(x), y.numpy()))
        return time.perf_counter() - start, time.process_time() - cpu

    framework_steps(3), hand_steps(3)  # trace both
    times = {"framework": [], "hand-written": []}
    for _ in range(args.rounds):
        times["framework"].append(framework_steps(args.steps))
        times["hand-written"].append(hand_steps(args.steps))
    if run.world.rank == 0:
        samples = args.steps * global_batch
        out = {name: samples / statistics.median(w for w, _ in t) for name, t in times.items()}
        out["ratios"] = [h[0] / f[0] for f, h in zip(times["framework"], times["hand-written"])]
        out["cpu_ratios"] = [h[1] / f[1] for f, h in zip(times["framework"], times["hand-written"])]
        out["params"] = int(sum(np.prod(v.shape) for v in net.trainable_variables))
        (Path(args.worker) / "result.json").write_text(json.dumps(out))


def demo_job(framework: str, epochs: int, folder: Path, code: Path = ROOT, sets=()) -> tuple[float, float, float]:
    """``autocnnp run`` of the demo job on ``framework`` with the package of checkout ``code``: samples/s of its
    first epoch, median samples/s of the later ones, final foreground Dice."""
    folder.mkdir(parents=True)
    job = folder / f"{framework}.xml"
    job.write_text(DEMO.read_text().replace("<path>runs/demo</path>", f"<path>{folder / framework}</path>"))
    done = subprocess.run([sys.executable, "-m", "autocnnp", "run", str(job), "--set", f"framework={framework}",
                           "--set", f"hyperparameters.end_epoch={epochs}", "--set", "monitoring.plots=false",
                           *(a for kv in sets for a in ("--set", kv))],
                          check=True, capture_output=True, text=True, cwd=code,
                          env={**os.environ, "PYTHONPATH": str(code)})
    speeds = [float(s) for s in re.findall(r"^epoch \d+/\d+ .*samples/s=([\d.]+)", done.stdout, re.M)]
    with open(folder / framework / "metrics.csv") as f:
        dice = float(list(csv.DictReader(f))[-1]["dice_fg"])
    return speeds[0], statistics.median(speeds[1:] or speeds), dice


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--baseline", type=Path, metavar="DIR", help="another checkout whose tensorflow demo job runs "
                    "alternated with this one's (the first epoch's samples/s before/after)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override the demo job in both parts (as autocnnp run --set), e.g. data.train_samples=16")
    ap.add_argument("--demo-rounds", type=int, default=2, help="alternated rounds of part 2")
    ap.add_argument("--parts", default="steps,demo", help="which parts to run: steps (1), demo (2)")
    ap.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    parts = args.parts.split(",")
    res = ranks_result(Path(__file__).resolve(), args.ranks, argv if argv is not None else sys.argv[1:], "mpirun",
                       "tensorflow-steps") if "steps" in parts else None
    if res is not None:
        ratio = statistics.median(res["ratios"])
        print(f"1. tensorflow steps, demo U-Net ({res['params']} parameters), {args.ranks} ranks, medians of "
              f"{args.rounds} alternated rounds of {args.steps} steps")
        print(table(("loop", "samples/s"), [(k, f"{res[k]:.1f}") for k in ("framework", "hand-written")]))
        print(f"framework / hand-written: {ratio:.3f} (goal >= 0.95); each round: "
              + ", ".join(f"{r:.3f}" for r in res["ratios"]))
        print(f"from rank 0's CPU time (all its threads; other load disturbs it less): "
              f"{statistics.median(res['cpu_ratios']):.3f}; each round: "
              + ", ".join(f"{r:.3f}" for r in res["cpu_ratios"]) + "\n")
    if "demo" not in parts:
        return 0
    runs = [("torch", ROOT), ("tensorflow", ROOT)]
    if args.baseline:
        runs.append(("tensorflow", args.baseline.resolve()))
    rows: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="autocnnp-frameworks-") as tmp:
        for i in range(args.demo_rounds):  # alternated: the machine's noise on every side
            for j, (framework, code) in enumerate(runs):
                name = framework if code == ROOT else f"{framework} (baseline)"
                rows.setdefault(name, []).append(demo_job(framework, args.epochs, Path(tmp) / f"{i}-{j}", code,
                                                          args.set))
    med = {name: [statistics.median(r[k] for r in runs_) for k in (0, 1)] for name, runs_ in rows.items()}
    print(f"2. the demo job, {args.epochs} epochs, {args.demo_rounds} alternated rounds; samples/s medians")
    print(table(("framework", "first epoch", "later epochs", "dice_fg"),
                [(n, f"{med[n][0]:.1f}", f"{med[n][1]:.1f}", f"{r[-1][2]:.4f}") for n, r in rows.items()]))
    print(f"tensorflow / torch samples/s: first epoch {med['tensorflow'][0] / med['torch'][0]:.3f}, "
          f"later epochs {med['tensorflow'][1] / med['torch'][1]:.3f}")
    if args.baseline:
        print("tensorflow first epoch, this checkout / baseline: "
              + ", ".join(f"{a[0] / b[0]:.2f}" for a, b in zip(rows["tensorflow"], rows["tensorflow (baseline)"]))
              + f" (median {med['tensorflow'][0] / med['tensorflow (baseline)'][0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
