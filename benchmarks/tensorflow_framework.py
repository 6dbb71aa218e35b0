"""The tensorflow framework against a hand-written MultiWorkerMirroredStrategy loop, and torch against
tensorflow on the same job, side by side in one run.

    python benchmarks/tensorflow_framework.py [--ranks 2] [--rounds 3] [--steps 30] [--epochs 3]

1. Step throughput (samples/s over the ranks): ``--ranks`` ranks (mpirun; the script re-launches itself)
   build the demo job's run through the tensorflow framework (keras_trainer.build: the MWMS strategy, the
   data pipeline, the Keras U-Net) and a hand-written loop on the same strategy, model architecture and
   batch: batches already in memory as tensors, ``strategy.run`` of a replica step with
   ``tf.nn.compute_average_loss`` and ``apply_gradients``, the loss read every step. The two alternate,
   ``--steps`` timed steps each round, ``--rounds`` rounds; medians. Goal: framework / hand-written >= 0.95.
2. The demo job (xml_configs/demo.xml, ``--epochs`` epochs) run by ``autocnnp run`` with framework torch and
   tensorflow, alternated: samples/s of the training steps (metrics.csv), final foreground Dice.

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
    from autocnnp.training import keras_trainer
    from autocnnp.training.monitor import MonitoringConfig

    gen = assemble(apply_overrides(read_job(DEMO), {"framework": "tensorflow"}))
    gen.rundir = type(gen.rundir)(Path(args.worker) / "run")
    run = keras_trainer.build(gen, MonitoringConfig(), timeout_s=300)
    strategy, batch = run.strategy.distribution, run.hp.minibatch_size
    images, labels = zip(*[(keras_trainer.nhwc(x), y.numpy()) for x, y in run.loader])
    with strategy.scope():  # the hand-written side: its own network of the same architecture and optimizer
        net = gen.action("architecture_injection").build(in_channels=run.data.in_channels,
                                                         num_classes=run.data.num_classes)
        opt = keras.optimizers.Adam(learning_rate=run.hp.lr, epsilon=1e-8)
        opt.build(net.trainable_variables)
    global_batch = batch * strategy.num_replicas_in_sync

    def replica(x, y):
        with tf.GradientTape() as tape:
            logits = net(x, training=True)
            per_sample = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(y, tf.int32), logits),
                                        axis=[1, 2])
            loss = tf.nn.compute_average_loss(per_sample, global_batch_size=global_batch)
        opt.apply_gradients(zip(tape.gradient(loss, net.trainable_variables), net.trainable_variables))
        return loss

    @tf.function
    def hand_step(x, y):
        return strategy.reduce("SUM", strategy.run(replica, args=(x, y)), axis=None)

    tensors = [(tf.constant(x), tf.constant(y)) for x, y in zip(images, labels)]

    def framework_steps(n: int) -> float:
        done, start = 0, time.perf_counter()
        while done < n:
            run.loader.set_epoch(done)
            for step, (x, y) in enumerate(run.loader):
                run.steps.step(x, y, run.policy.lr(0, step))
                done += 1
                if done == n:
                    break
        return time.perf_counter() - start

    def hand_steps(n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            float(hand_step(*tensors[i % len(tensors)]))
        return time.perf_counter() - start

    framework_steps(3), hand_steps(3)  # trace both
    times = {"framework": [], "hand-written": []}
    for _ in range(args.rounds):
        times["framework"].append(framework_steps(args.steps))
        times["hand-written"].append(hand_steps(args.steps))
    if run.world.rank == 0:
        samples = args.steps * global_batch
        out = {name: samples / statistics.median(t) for name, t in times.items()}
        out["params"] = int(sum(np.prod(v.shape) for v in net.trainable_variables))
        (Path(args.worker) / "result.json").write_text(json.dumps(out))


def demo_job(framework: str, epochs: int, folder: Path) -> tuple[float, float]:
    """``autocnnp run`` of the demo job on ``framework``: median samples/s of its epochs, final foreground Dice."""
    folder.mkdir(parents=True)
    job = folder / f"{framework}.xml"
    job.write_text(DEMO.read_text().replace("<path>runs/demo</path>", f"<path>{folder / framework}</path>"))
    done = subprocess.run([sys.executable, "-m", "autocnnp", "run", str(job), "--set", f"framework={framework}",
                           "--set", f"hyperparameters.end_epoch={epochs}", "--set", "monitoring.plots=false"],
                          check=True, capture_output=True, text=True, cwd=ROOT)
    speeds = [float(s) for s in re.findall(r"^epoch \d+/\d+ .*samples/s=([\d.]+)", done.stdout, re.M)]
    with open(folder / framework / "metrics.csv") as f:
        dice = float(list(csv.DictReader(f))[-1]["dice_fg"])
    return statistics.median(speeds[1:] or speeds), dice  # the first epoch traces and warms up


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    res = ranks_result(Path(__file__).resolve(), args.ranks, argv if argv is not None else sys.argv[1:], "mpirun",
                       "tensorflow-steps")
    if res is not None:
        ratio = res["framework"] / res["hand-written"]
        print(f"1. tensorflow steps, demo U-Net ({res['params']} parameters), {args.ranks} ranks, medians of "
              f"{args.rounds} alternated rounds of {args.steps} steps")
        print(table(("loop", "samples/s"), [(k, f"{res[k]:.1f}") for k in ("framework", "hand-written")]))
        print(f"framework / hand-written: {ratio:.3f} (goal >= 0.95)\n")
    with tempfile.TemporaryDirectory(prefix="autocnnp-frameworks-") as tmp:
        rows = {}
        for framework in ("torch", "tensorflow", "torch", "tensorflow"):  # alternated: the machine's noise on both
            speed, dice = demo_job(framework, args.epochs, Path(tmp) / f"{framework}-{len(rows)}")
            rows.setdefault(framework, []).append((speed, dice))
    print(f"2. the demo job, {args.epochs} epochs, 2 ranks, both frameworks twice (alternated)")
    print(table(("framework", "samples/s", "dice_fg"),
                [(f, f"{statistics.median(s for s, _ in r):.1f}", f"{r[-1][1]:.4f}") for f, r in rows.items()]))
    torch_speed, tf_speed = (statistics.median(s for s, _ in rows[f]) for f in ("torch", "tensorflow"))
    print(f"tensorflow / torch samples/s: {tf_speed / torch_speed:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
