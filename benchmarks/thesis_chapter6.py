"""The thesis' chapter 6 on one machine, with virtual ranks: U-Net on the brain and left-atrium stand-ins and
FCN on the atrium (``autocnnp synth`` volumes), at parallelism 1 and 12-18 (one process emulating the ranks,
``<parallelism-degree virtual="N">1``), under three policies: the linear scaling rule without warmup
(linear_scaling), with gradual warmup (gradual_warmup), and the guideline (``autocnnp tune --from-job``:
GreScale with its ordered actions, against the 1-rank baseline). Prints Dice, mean accuracy and mean IoU
per setting (as Figures 6.4-6.6, mean over the seeds) and the guideline's action sequences (as Tables
6.1-6.10), with the run times. Runs completed in ``--out`` are kept: an interrupted benchmark resumes
(give it another folder to start afresh); ``--report`` prints what is done so far. ``--overhead``
measures instead the wall time and peak memory of 18 virtual
ranks on 2 processes against 2 real ranks at the same global batch.

    python benchmarks/thesis_chapter6.py                      # the reduced run (about 20-30 min on 2 cores)
    python benchmarks/thesis_chapter6.py --seeds 0 1 2 --epochs 30 --cases 24 --degrees 1 12 14 16 18
    python benchmarks/thesis_chapter6.py --overhead
    python benchmarks/thesis_chapter6.py --tasks fcn-atrium --shape 32 32 16    # FCN takes sides of 32k
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from autocnnp.core.text import text_table
from autocnnp.generator.overrides import degree_overrides

ROOT = Path(__file__).resolve().parents[1]
AUTOCNNP = [sys.executable, "-m", "autocnnp"]
METRICS = ("dice", "mean_accuracy", "mean_iou")
POLICIES = {"linear, no warmup": "linear_scaling", "linear + warmup": "gradual_warmup", "guideline": None}
TASKS = {"unet-brain": ("unet", "brain"), "unet-atrium": ("unet", "atrium"), "fcn-atrium": ("fcn", "atrium")}
ARCHS = {"unet": '<CNN_archi name="unet"><param name="depth">3</param><param name="base_channels">8</param>'
                 '<param name="norm">batch</param></CNN_archi>',
         "fcn": '<CNN_archi name="fcn"><param name="width">0.125</param><param name="norm">batch</param></CNN_archi>'}

JOB = """<?xml version="1.0" encoding="UTF-8"?>
<system_config><task name="imaging_segmentation">
  <parallelism-degree>1</parallelism-degree><seed>0</seed><output><path>runs/job</path></output>
  {arch}
  <CNN-Parallelism-Generator><module name="train_strategy_def">
    <action class="extensible" type="dist_strategy"><value>ring_allreduce</value></action>
    <action class="extensible" type="lr_policy"><value>constant</value></action>
  </module></CNN-Parallelism-Generator>
  <data format="decathlon"><train><path>{data}</path></train><param name="slices_per_volume">{slices}</param>
    <param name="size">{size}</param><param name="cache">{cache}</param><param name="valid_fraction">0.25</param></data>
  <monitoring><property name="plots">false</property><property name="tensorboard">false</property>
    <property name="progress">false</property></monitoring>
  <cluster><property name="launcher">inplace</property></cluster>
  <hyperparameters><property name="lr">{lr}</property><property name="optimiser">{optimizer}</property>
    <property name="loss">dice_ce</property><property name="minibatch_size">{batch}</property>
    <property name="end_epoch">{epochs}</property></hyperparameters>
</task></system_config>
"""


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (its output to ``log``); its wall time. Exits with the log's tail if it fails."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code != 0:
        sys.exit(f"failed ({code}): {' '.join(cmd)}\n" + "\n".join(log.read_text().splitlines()[-30:]))
    return time.perf_counter() - start


def last_metrics(out: Path) -> dict[str, float]:
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {m: float(rows[-1][m]) for m in METRICS}


def sets(overrides: dict[str, str]) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


def prepare(args, work: Path) -> dict[str, Path]:
    """One job file per task over its ``autocnnp synth`` dataset."""
    jobs = {}
    for task in args.tasks:
        arch, kind = TASKS[task]
        data = work / f"data-{kind}"
        if not (data / "dataset.json").exists():
            run([*AUTOCNNP, "synth", str(data), "--kind", kind, "--cases", str(args.cases), "--shape",
                 *map(str, args.shape), "--seed", "0", "--test-cases", "0"], work / f"synth-{kind}.log")
        jobs[task] = work / f"{task}.xml"
        jobs[task].write_text(JOB.format(arch=ARCHS[arch], data=data, slices=args.slices, size=args.shape[0],
                                         cache=work / f"cache-{kind}", lr=args.lr, optimizer=args.optimizer,
                                         batch=args.minibatch, epochs=args.epochs))
    return jobs


def chapter(args, work: Path) -> None:
    jobs = prepare(args, work)
    results: dict[tuple, list[dict]] = {}
    sequences: dict[tuple, list[str]] = {}
    seconds: dict[str, float] = {}

    def train(task: str, cmd: list[str], out: Path) -> bool:
        """Run ``cmd`` (writing ``out``) unless an earlier benchmark did (``--report``: never); whether it is
        done. Its wall time is kept in ``out/wall_s.txt``, which marks it done, and summed per task."""
        done = out / "wall_s.txt"
        if not done.exists() and not args.report:
            shutil.rmtree(out, ignore_errors=True)  # an interrupted run: start it afresh
            wall = run(cmd, work / "last.log")
            done.write_text(f"{wall:.1f}")
        if done.exists():
            seconds[task] = seconds.get(task, 0.0) + float(done.read_text())
        return done.exists()

    for seed in args.seeds:  # seed by seed: an interrupted benchmark has whole seeds to report
        for task, job in jobs.items():
            common = {"seed": str(seed), "hyperparameters.end_epoch": str(args.epochs)}
            warmup = {"lr_policy.warmup_epochs": str(args.warmup)}
            base = work / "runs" / f"{task}-s{seed}-1"
            if not train(task, [*AUTOCNNP, "run", str(job), *sets({**common, "output": str(base)})], base):
                continue
            results.setdefault((task, 1, "baseline"), []).append(last_metrics(base))
            for n in (d for d in args.degrees if d > 1):
                degree = degree_overrides(n, 1)
                for label, policy in POLICIES.items():
                    out = work / "runs" / f"{task}-s{seed}-{n}-{policy or 'guideline'}"
                    if policy is not None:
                        ramp = warmup if policy == "gradual_warmup" else {}
                        cmd = [*AUTOCNNP, "run", str(job), *sets({**common, **degree, "lr_policy": policy, **ramp,
                                                                 "output": str(out)})]
                        if train(task, cmd, out):
                            results.setdefault((task, n, label), []).append(last_metrics(out))
                        continue
                    cmd = [*AUTOCNNP, "tune", str(job), "--from-job", "--processes", "1", "--baseline", str(base),
                           "--budget", str(args.budget), "--ranks-threshold", "12", "--out", str(out),
                           *sets({**common, **degree, "lr_policy": "grescale", **warmup})]
                    if not train(task, cmd, out):
                        continue
                    state = json.loads((out / "state.json").read_text())
                    results.setdefault((task, n, label), []).append(state["best"]["metrics"])
                    with open(out / "tune.csv") as f:
                        sequences[(task, n, seed)] = [f"{r['iteration']}: {r['action']} (dice {float(r['dice']):.4f})"
                                                      for r in csv.DictReader(f) if r["dice"]]
    print(f"\nthesis chapter 6 with virtual ranks: seeds {args.seeds}, {args.epochs} epochs ({args.warmup} of warmup), "
          f"{args.cases} synth cases "
          f"of {'x'.join(map(str, args.shape))} ({args.slices} slices each, 1/4 of the cases for validation), "
          f"minibatch {args.minibatch} per rank, {args.optimizer} lr {args.lr}, tune budget {args.budget} runs\n")
    rows = []
    for (task, n, label), got in results.items():
        rows.append([task, str(n), label, *(f"{100 * statistics.mean(g[m] for g in got):.2f}"
                                            + (f" ±{100 * statistics.stdev(g[m] for g in got):.2f}" if len(got) > 1 else "")
                                            for m in METRICS)])
    print(text_table(["task", "ranks", "policy", "Dice %", "mean acc. %", "mean IoU %"], rows))
    print("\nthe guideline's action sequences (autocnnp tune, dice of each run):")
    for (task, n, seed), steps in sequences.items():
        print(f"  {task} {n} ranks seed {seed}: " + "; ".join(steps))
    print("\nrun time: " + ", ".join(f"{t} {s / 60:.1f} min" for t, s in seconds.items()))


def overhead(args, work: Path) -> None:
    """18 virtual ranks on 2 processes against 2 real ranks with minibatch x 9: the same global batch."""
    job = prepare(argparse.Namespace(**{**vars(args), "tasks": ["unet-atrium"]}), work)["unet-atrium"]
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    rows = []
    for label, over in (("2 real ranks, minibatch x 9", {"parallelism-degree": "2", "hyperparameters.minibatch_size":
                                                         str(9 * args.minibatch)}),
                        ("2 processes x 9 virtual ranks", degree_overrides(18, 2))):
        out = work / "runs" / ("overhead-" + label.split(",")[0].replace(" ", "-"))
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-c", probe, *AUTOCNNP, "run", str(job),
               *sets({**over, "cluster.launcher": "mpirun", "output": str(out)})]
        log = work / "overhead.log"
        wall = run(cmd, log)
        rss = int(log.read_text().split()[-1]) / 1024
        speed = float((out / "logs" / "rank0.log").read_text().rsplit("samples/s=", 1)[1].split()[0])
        rows.append([label, f"{wall:.1f}", f"{speed:.1f}", f"{rss:.0f}", f"{last_metrics(out)['dice']:.4f}"])
    print(f"minibatch {args.minibatch} per virtual rank, global batch {18 * args.minibatch}, {args.epochs} epochs")
    print(text_table(["setting", "wall s", "samples/s (last epoch)", "peak rank RSS MiB", "dice"], rows))
    print(f"ratios virtual/real: wall time {float(rows[1][1]) / float(rows[0][1]):.2f}, training speed "
          f"{float(rows[1][2]) / float(rows[0][2]):.2f}, memory {float(rows[1][3]) / float(rows[0][3]):.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/autocnnp-chapter6", help="work folder (data, jobs, runs)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--degrees", nargs="+", type=int, default=[1, 12, 18])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--cases", type=int, default=8, help="synth cases (1/4 of them validate)")
    p.add_argument("--shape", nargs=3, type=int, default=[16, 16, 16])
    p.add_argument("--slices", type=int, default=12, help="slices per training volume")
    p.add_argument("--minibatch", type=int, default=1, help="per rank")
    p.add_argument("--lr", type=float, default=1e-3, help="the 1-rank learning rate")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--warmup", type=int, default=2, help="warmup epochs of gradual_warmup and GreScale's start")
    p.add_argument("--budget", type=int, default=3, help="training runs per tune (the baseline is given)")
    p.add_argument("--report", action="store_true", help="print the table of the runs done so far, run nothing")
    p.add_argument("--overhead", action="store_true", help="measure 18 virtual ranks on 2 processes instead")
    args = p.parse_args(argv)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    overhead(args, work) if args.overhead else chapter(args, work)


if __name__ == "__main__":
    main()
