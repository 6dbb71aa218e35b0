"""Training throughput: the framework's step loop vs a minimal hand-written torch DDP loop.

    python benchmarks/train_throughput.py [--rounds 6] [--warmup 5] [--steps 20] [--ranks 2]
    python benchmarks/train_throughput.py --device cuda --precision bf16 --channels-last   # on GPUs

Both sides train the same U-Net (``components/architectures/unet.py``) on the same synthetic data
(``SyntheticSliceDataset``, as ``<data format="synthetic">`` builds it) with the same per-rank batch,
optimizer (SGD, momentum 0.9), loss (pixel cross-entropy), DataLoader settings (DistributedSampler,
``drop_last``, workers), threads per rank (the trainer's rule: the process's threads divided by the
ranks on the node), process group and ranks, in the same processes, alternating
framework / hand / framework / hand (A B A B) to spread the machine's drift over both.

* framework: a generated job (``ring_allreduce``, ``constant`` LR policy, defaults elsewhere, so the
  Monitor, TensorBoard step logging, divergence guard and heartbeats all run) is assembled and
  trained for one epoch by ``autocnnp.run.worker.run_rank`` -- the very code an
  ``autocnnp run`` rank executes. Each step is stamped when the trainer hands it to
  ``Monitor.step`` (the class method is wrapped for the run; nothing in the framework changes).
* hand: ``DistributedDataParallel`` + ``DataLoader`` + ``for x, y in loader: forward, zero_grad,
  backward, step, loss.item()`` (the loss is read every step on both sides, as any loop that logs
  or guards its loss does; on a GPU that is also what makes the per-step stamps honest).

Only training steps are timed: the first ``--warmup`` steps of each run are dropped; the step times
are the intervals between consecutive step ends after that; start-up, evaluation, checkpoints and
plots fall outside. The rate is ``batch x ranks`` / median step time (robust to bursts of other
load on a shared machine), and also ``steps x batch x ranks`` over the whole timed window (mean); the
CPU time per step of rank 0's process (all threads: the trainer's monitor and TensorBoard threads
count) gives a ratio that other processes competing for the cores disturb much less.
Prints per-round rates, their medians and the ratio framework / hand (target >= 0.97), and what the
trainer adds around each step (heartbeat, LR update, divergence guard, ``Monitor.step``) timed
alone, a view of the overhead that other load on the machine cannot blur. Figures, not asserts: exits 0.

GPU variant (``--device cuda``): NCCL, one rank per GPU (``--ranks`` defaults to the GPU count:
NCCL does not allow two ranks on one GPU), U-Net depth 4 / 32 base channels on 256 x 256 slices,
batch 16 per rank and (CPU cores per rank - 2, at most 12) DataLoader workers per rank unless given
(check with ``input_pipeline.py --device cuda`` that the loader outruns the GPU; ``--kind atrium``
generates 1-channel slices, 4 x cheaper); ``--precision bf16`` and
``--channels-last`` set the job's ``precision`` and ``channels_last`` hyperparameters and the same
autocast / memory format in the hand loop. Ranks are started with ``mpirun`` (``torchrun`` where
Open MPI is missing; one rank runs in this process's child directly).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import init_process_group, ranks_result, table  # noqa: E402

from autocnnp.training.precision import AUTOCAST_DTYPES  # noqa: E402

TARGET = 0.97
SHAPES = {"brain": (4, 4), "atrium": (1, 2)}  # kind -> (channels, classes), as components/datasets/synthetic.py

JOB = """<?xml version="1.0" encoding="UTF-8"?>
<system_config>
  <task name="imaging_segmentation">
    <parallelism-degree>{ranks}</parallelism-degree>
    <seed>0</seed>
    <output><path>runs/{output}</path></output>
    {architecture}
    <CNN-Parallelism-Generator>
      <module name="train_env_def">
        <action class="non_extensible" type="communication_init">
          <value>torch_distributed</value><value name="backend">{backend}</value>
        </action>
        <action class="non_extensible" type="device_placement"><value>{placement}</value></action>
      </module>
      <module name="train_strategy_def">
        <action class="extensible" type="dist_strategy"><value>ring_allreduce</value></action>
        <action class="extensible" type="lr_policy"><value>constant</value></action>
      </module>
    </CNN-Parallelism-Generator>
    {data}
    <hyperparameters>
      <property name="lr">0.01</property>
      <property name="optimiser">sgd</property>
      <property name="momentum">0.9</property>
      <property name="loss">ce</property>
      <property name="minibatch_size">{batch}</property>
      <property name="end_epoch">1</property>{hyperparameters}
    </hyperparameters>
    <monitoring><property name="plots">false</property></monitoring>
  </task>
</system_config>
"""  # train3d_throughput.py fills it with its 3D network and data


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--ranks", type=int, help="default: 2 on cpu, the number of GPUs on cuda")
    ap.add_argument("--launcher", choices=("auto", "mpirun", "torchrun", "inplace"), default="auto")
    ap.add_argument("--size", type=int, help="slice size (default 64 on cpu, 256 on cuda)")
    ap.add_argument("--depth", type=int, help="U-Net depth (default 3 on cpu, 4 on cuda)")
    ap.add_argument("--base-channels", type=int, help="U-Net base channels (default 16 on cpu, 32 on cuda)")
    ap.add_argument("--norm", choices=("batch", "group", "none"), default="batch")
    ap.add_argument("--batch", type=int, help="per-rank minibatch (default 4 on cpu, 16 on cuda)")
    ap.add_argument("--workers", type=int, help="DataLoader workers per rank (default 0 on cpu; on cuda the CPU "
                    "cores per rank less 2, at most 12: 256 x 256 synthetic slices take milliseconds each)")
    ap.add_argument("--kind", choices=tuple(SHAPES), default="brain")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of every run")
    ap.add_argument("--steps", type=int, help="timed steps per run (default 20 on cpu, 50 on cuda)")
    ap.add_argument("--rounds", type=int, default=6, help="framework/hand pairs, alternated")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (job, run outputs)")
    ap.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)  # internal: this process is a rank
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    for name, cpu, cuda in (("size", 64, 256), ("depth", 3, 4), ("base_channels", 16, 32), ("batch", 4, 16),
                            ("steps", 20, 50)):
        if getattr(args, name) is None:
            setattr(args, name, cuda if gpu else cpu)
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------
# rank side


def framework_run(args, job: Path, out: Path) -> list[tuple[float, float]]:
    """One epoch of the real job on this rank; (wall, CPU) time of every step as the trainer reports it."""
    from autocnnp.generator.overrides import read_variant
    from autocnnp.run.job import load_job
    from autocnnp.run.worker import run_rank
    from autocnnp.training.monitor import Monitor

    stamps: list[tuple[float, float]] = []
    original = Monitor.step

    def stamped(self, *a, **k):
        stamps.append((time.perf_counter(), time.process_time()))
        return original(self, *a, **k)

    fresh = load_job(read_variant(job, {"output": str(out)}))  # a fresh folder per run: nothing to resume
    Monitor.step = stamped
    try:
        run_rank(fresh)
    finally:
        Monitor.step = original
    return stamps


def hand_run(args, world, threads: int) -> list[tuple[float, float]]:
    """The minimal torch DDP loop over the same model, data and settings."""
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    from autocnnp.components.architectures.unet import UNet
    from autocnnp.data.synthetic_slices import SyntheticSliceDataset

    torch.set_num_threads(max(1, threads // max(1, world.local_world_size)))
    if args.device == "cuda":
        device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    init_process_group("nccl" if args.device == "cuda" else "gloo", world)
    channels, classes = SHAPES[args.kind]
    n_train = train_samples(args)
    data = SyntheticSliceDataset(args.kind, n_train + args.ranks, args.size, channels, classes, seed=0,
                                 in_memory=True)  # as <data format="synthetic"> builds it
    train = Subset(data, range(n_train))
    torch.manual_seed(0)
    net = UNet(channels, classes, depth=args.depth, base_channels=args.base_channels, norm=args.norm).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sampler = DistributedSampler(train, num_replicas=world.world_size, rank=world.rank, shuffle=True, seed=0)
    sampler.set_epoch(0)
    loader = DataLoader(train, batch_size=args.batch, sampler=sampler, drop_last=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    dtype = AUTOCAST_DTYPES[args.precision]
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    stamps: list[tuple[float, float]] = []
    model.train()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        loss.item()
        stamps.append((time.perf_counter(), time.process_time()))
    return stamps


def bookkeeping_s(args, job: Path, out: Path, steps: int = 2000) -> float:
    """Seconds per step of what the trainer adds around a step on rank 0 (heartbeat, LR update, divergence
    guard, Monitor.step with its TensorBoard logging), timed alone: a noise-free view of the overhead."""
    import torch

    from autocnnp.core.rundir import RunDir
    from autocnnp.run.job import load_job
    from autocnnp.run.supervise import RankStatus
    from autocnnp.training.monitor import DivergenceGuard, Monitor

    loaded = load_job(job)
    policy = loaded.generator.lr_policy(steps_per_epoch=steps, world_size=args.ranks)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    guard = DivergenceGuard(loaded.monitoring.divergence_factor, loaded.monitoring.stop_on_divergence)
    status = RankStatus(RunDir(out), 0)
    with Monitor(RunDir(out), 0, args.ranks, loaded.monitoring, 1, steps, start_epoch=0) as monitor:
        start = time.perf_counter()
        for step in range(steps):
            status.beat()
            for group in optimizer.param_groups:
                group["lr"] = policy.lr(0, step) * 1.0
            guard.check(1.0, 0, step)
            monitor.step(0, step, 1.0, args.batch)
        took = time.perf_counter() - start
    return took / steps


def train_samples(args) -> int:
    return args.ranks * args.batch * (args.warmup + args.steps)


def worker(args) -> int:
    import torch

    from autocnnp.core.world import discover_world

    world = discover_world()
    folder = Path(args.worker)
    threads = torch.get_num_threads()  # the trainer divides the process's threads by the local ranks
    runs = []
    for r in range(args.rounds):
        for mode in ("framework", "hand"):
            torch.set_num_threads(threads)
            if mode == "framework":
                stamps = framework_run(args, folder / "job.xml", folder / f"framework{r}")
            else:
                stamps = hand_run(args, world, threads)
            runs.append({"round": r, "mode": mode, "stamps": stamps})
    if world.rank == 0:
        overhead = bookkeeping_s(args, folder / "job.xml", folder / "bookkeeping")
        (folder / "result.json").write_text(json.dumps({"runs": runs, "threads": threads, "bookkeeping_s": overhead}))
    return 0


# ---------------------------------------------------------------------------------------------
# launcher side


def rates(args, stamps: list[list[float]]) -> tuple[float, float, float]:
    """Over the timed steps: samples/s (all ranks) from the median step time and from the window's mean,
    and the median CPU seconds per step of this rank's process (all its threads)."""
    if len(stamps) != args.warmup + args.steps:
        raise SystemExit(f"expected {args.warmup + args.steps} steps, got {len(stamps)}")
    timed = stamps[args.warmup - 1:]
    wall = [b[0] - a[0] for a, b in zip(timed, timed[1:])]
    cpu = [b[1] - a[1] for a, b in zip(timed, timed[1:])]
    samples = args.batch * args.ranks
    return samples / statistics.median(wall), args.steps * samples / (timed[-1][0] - timed[0][0]), \
        statistics.median(cpu)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.ranks is None:
        if args.device == "cuda":
            import torch

            args.ranks = max(1, torch.cuda.device_count())
        else:
            args.ranks = 2
    gpu = args.device == "cuda"
    if args.workers is None:
        args.workers = min(12, max(2, (os.cpu_count() or 1) // args.ranks - 2)) if gpu else 0
    folder = Path(tempfile.mkdtemp(prefix="autocnnp-throughput-"))
    try:
        (folder / "job.xml").write_text(JOB.format(
            ranks=args.ranks, output="throughput", backend="nccl" if gpu else "gloo",
            placement="local_rank" if gpu else "cpu", batch=args.batch,
            architecture=f'<CNN_archi name="unet"><param name="depth">{args.depth}</param><param name="base_channels">'
                         f'{args.base_channels}</param><param name="norm">{args.norm}</param></CNN_archi>',
            data=f'<data format="synthetic"><param name="kind">{args.kind}</param><param name="train_samples">'
                 f'{train_samples(args)}</param><param name="valid_samples">{args.ranks}</param>'
                 f'<param name="size">{args.size}</param></data>',
            hyperparameters=f'<property name="precision">{args.precision}</property><property name="channels_last">'
                            f'{str(args.channels_last).lower()}</property><property name="loader_workers">'
                            f'{args.workers}</property>'))
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--keep"]
        forwarded = [*forwarded, "--ranks", str(args.ranks), "--workers", str(args.workers)]
        started = time.perf_counter()
        result = ranks_result(Path(__file__).resolve(), args.ranks, forwarded, args.launcher, "train_throughput", folder)
        if result is None:
            return 0
        wall = time.perf_counter() - started
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    by_round: dict[int, dict[str, tuple[float, float, float]]] = {}
    for run in result["runs"]:
        by_round.setdefault(run["round"], {})[run["mode"]] = rates(args, run["stamps"])
    rows = []
    for r, v in sorted(by_round.items()):
        (fw_r, _, fw_cpu), (hand_r, _, hand_cpu) = v["framework"], v["hand"]
        rows.append((f"round {r + 1}", f"{fw_r:.1f}", f"{hand_r:.1f}", f"{fw_r / hand_r:.3f}",
                     f"{fw_cpu * 1e3:.1f}", f"{hand_cpu * 1e3:.1f}", f"{hand_cpu / fw_cpu:.3f}"))

    def median(mode: str, which: int) -> float:
        return statistics.median(v[mode][which] for v in by_round.values())

    fw, hand = median("framework", 0), median("hand", 0)
    fw_mean, hand_mean = median("framework", 1), median("hand", 1)
    fw_cpu, hand_cpu = median("framework", 2), median("hand", 2)
    paired = statistics.median(v["framework"][0] / v["hand"][0] for v in by_round.values())
    rows.append(("median", f"{fw:.1f}", f"{hand:.1f}", f"{fw / hand:.3f}", f"{fw_cpu * 1e3:.1f}",
                 f"{hand_cpu * 1e3:.1f}", f"{hand_cpu / fw_cpu:.3f}"))
    channels, classes = SHAPES[args.kind]
    backend = "nccl" if gpu else "gloo"
    print(f"train throughput: U-Net depth {args.depth}, {args.base_channels} base channels, norm {args.norm}; "
          f"synthetic {args.kind} {args.size}x{args.size} ({channels} ch, {classes} classes); batch {args.batch}/rank "
          f"x {args.ranks} ranks ({args.device}, {backend}, {args.precision}"
          f"{', channels_last' if args.channels_last else ''}, {args.workers} loader workers, "
          f"{max(1, result['threads'] // args.ranks)} threads/rank)")
    print(f"{args.warmup} warm-up + {args.steps} timed steps per run, {args.rounds} rounds alternating "
          f"framework/hand; {wall:.0f} s in all. samples/s from the median step time; CPU ms/step: rank 0's "
          f"process, median; ratios > 1 favour the framework")
    print(table(("", "framework samples/s", "hand DDP samples/s", "ratio", "framework CPU ms/step",
                 "hand CPU ms/step", "CPU ratio"), rows))
    ratio = fw / hand
    print(f"ratio framework / hand: {ratio:.3f} from median step times (median of per-round ratios {paired:.3f}; "
          f"from window means {fw_mean / hand_mean:.3f}; from rank 0's CPU time per step {hand_cpu / fw_cpu:.3f}); "
          f"target >= {TARGET}: {'ok' if ratio >= TARGET else 'BELOW'}")
    book = result["bookkeeping_s"]
    step = args.batch * args.ranks / hand
    print(f"trainer bookkeeping per step, timed alone (heartbeat, LR, divergence guard, Monitor.step, TensorBoard): "
          f"{book * 1e6:.1f} us = {book / step * 100:.3f} % of a {step * 1e3:.1f} ms hand-loop step "
          f"(ratio bound from it: {step / (step + book):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
