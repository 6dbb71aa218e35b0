"""``autocnnp scale JOB.xml``: profile one rank's step of the job on this machine and predict throughput,
speedup and efficiency at 1..1024 ranks with the model of :mod:`.scaling` (the strategy's own traffic,
a network preset or a measured link, the data path). ``--preset r2d2-unet|r2d2-fcn`` replays R2D2's
18-GPU experiments from stated assumptions instead of a profile.

Heavy modules (torch, matplotlib) are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..core.cli_args import options_of
from ..core.errors import ExitCode, JobError, did_you_mean
from ..core.processes import usable_cores
from ..generator.points import POINT_BY_NAME
from ..generator.protocols import Strategy, Traffic, adopt, shards_of, steps_per_epoch
from ..run.job import Job, load_job
from .scaling import (
    GB,
    LINKS,
    DataPath,
    Link,
    Placement,
    Profile,
    Report,
    bucket_overlap,
    option,
    parse_data_path,
    plot,
    powers_of_two,
    predict,
    table,
)

WARMUP_STEPS = 5  # the first steps pay for kernel selection and allocation
VALIDATION_BATCHES = 4  # of the validation pass between the profile's warm-up and its timed steps


def profile_job(job: Job, copies: dict[int, int], steps: int) -> Profile:
    """Profile the job's step as its ranks run it on this node: for each ``threads: k`` of ``copies``, a short
    run of the job on k ranks, started as run & manage starts them (mpirun, its binding, ``threads`` threads
    per rank), each rank building its run as a training rank does and timing the training loop's own steps
    (:func:`profile_run`). A synchronous step lasts as long as its slowest rank: the compute and backward
    times are those of the slowest rank (cores are not alike: SMT siblings, other work), the data time the
    median, the time blocked in the exchange the shortest (the slowest rank's)."""
    from ..run import preflight

    preflight.fetch_pretrained(job)
    preflight.check_data(job)  # the data cached once, as run & manage does: the profile's ranks read it
    job.rundir.cache.mkdir(parents=True, exist_ok=True)
    figures: dict[int, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="autocnnp-scale-") as tmp:
        for threads, k in copies.items():
            out = Path(tmp) / f"threads-{threads}"
            out.mkdir()
            (out / "cache").symlink_to(job.rundir.cache, target_is_directory=True)
            variant = job.variant({"output": str(out), "parallelism-degree": str(k)})
            figures[threads] = _profile_on_ranks(variant, out, steps, threads)
    for fs in figures.values():
        if len(fs) == 1:  # a lone rank's time in its strategy's collectives (a group of one) is its own work
            fs[0]["compute_s"] += fs[0]["exchange_s"]
    first = next(iter(figures.values()))[0]

    def over_ranks(key: str, of=statistics.median) -> dict[int, float]:
        return {t: of(f[key] for f in fs) for t, fs in figures.items()}

    # a rank waits in the exchange for the last rank's gradients: the others' waits hold the skew the slowest
    # rank's compute already counts, the slowest rank's (the shortest) is the exchange itself
    exchanged = {t: s for t, s in over_ranks("exchange_s", min).items() if len(figures[t]) > 1}
    return Profile(first["batch"], over_ranks("compute_s", max), over_ranks("backward_s", max),
                   over_ranks("data_s"), first["grad_bytes"], first["model_bytes"], first["sample_bytes"],
                   first["loader_workers"], first["train_samples"], exchanged)


def _profile_on_ranks(job: Job, out: Path, steps: int, threads: int) -> list[dict]:
    """Every rank's figures from :func:`profile_run`, the ranks started on this machine by mpirun as run &
    manage starts the job's (``threads`` threads each); their output goes to OUT/profile.log."""
    from ..run import processes
    from ..run.launch import MPIRUN_HINT, build_command

    if shutil.which("mpirun") is None:
        raise JobError(job.spec.where, "autocnnp scale starts the job's ranks with mpirun, which is not installed",
                       MPIRUN_HINT)
    local = dataclasses.replace(job, launch=dataclasses.replace(job.launch, launcher="mpirun", hostfile=None))
    cmd, env = build_command(local, {**os.environ, "OMP_NUM_THREADS": str(threads)},
                             program=("autocnnp.tuning.scale", str(out), str(steps)))
    log = out / "profile.log"
    with open(log, "w") as f:
        proc = processes.start(cmd, env, stdout=f, stderr=subprocess.STDOUT)
        try:
            code = proc.wait()
        finally:  # an interrupted command leaves no rank behind
            processes.stop_session(proc, 5.0)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"profiling the job's step on {job.world_size} rank(s) with {threads} thread(s) each "
                           f"failed (exit code {code}):\n{tail}")
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(job.world_size)]


class _StepTimes:
    """The run's monitor as the training loop's steps see it, also keeping every step's seconds: all of it,
    waiting for data, in collectives, and the backward pass (``backward``: its start and its last gradient,
    set by hooks)."""

    def __init__(self, monitor, backward: list[float]) -> None:
        self.monitor, self.backward, self.steps = monitor, backward, []

    def step(self, *args) -> None:
        self.monitor.step(*args)
        self.steps.append((*self.monitor.last_step, self.backward[1] - self.backward[0]))


def profile_run(run, monitoring, steps: int) -> dict:
    """This rank's figures from ``steps`` steps of the training loop's own code
    (:func:`~autocnnp.training.loop.train_steps`, epoch after epoch until done: the loader, the step through
    the job's strategy, the divergence guard and the monitor as a run has them; no checkpoint or tracker),
    after an epoch of WARMUP_STEPS steps and the first VALIDATION_BATCHES of its validation pass. Means (a
    run's throughput is its mean step's, slow steps included; the parts add up to the step) of: the step less
    its wait for the minibatch and its time blocked in the strategy's collectives (compute), the wait (data),
    the time in collectives (exchange), the backward pass (from the forward's end to the last gradient)."""
    import torch

    from ..training.loop import begin_epoch, evaluate, train_steps
    from ..training.monitor import Monitor

    net = run.strategy.unwrap(run.steps.model)
    backward = [0.0, 0.0]

    def forward_end(*_) -> None:
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        backward[0] = time.perf_counter()

    def last_gradient(_param) -> None:
        backward[1] = time.perf_counter()

    net.register_forward_hook(forward_end)
    trainable = [p for p in net.parameters() if p.requires_grad]
    for param in trainable:
        param.register_post_accumulate_grad_hook(last_gradient)
    warmup = min(WARMUP_STEPS, len(run.loader))
    epochs = 1 + -(-steps // len(run.loader))  # the warm-up's, then as many as the timed steps take
    with Monitor(run.gen.rundir, run.world.rank, run.world.world_size, monitoring, epochs, len(run.loader),
                 start_epoch=0) as monitor:
        timed = _StepTimes(monitor, backward)
        for epoch in range(epochs):
            begin_epoch(run, epoch)
            train_steps(run, epoch, timed, lambda: None,
                        limit=warmup if epoch == 0 else warmup + steps - len(timed.steps))
            trained = run.steps.end_steps()
            if epoch == 0:  # an epoch's end as a run has it: its validation takes and gives back larger batches
                evaluator = run.task.evaluator(run.data.num_classes, run.data.class_names, run.regions)
                evaluate(trained, itertools.islice(run.valid_loader, VALIDATION_BATCHES), evaluator, run.loss_fn,
                         run.world, infer=run.data.infer)
    kept = timed.steps[warmup:]
    floats = (*net.parameters(), *(b for b in net.buffers() if b.is_floating_point()))
    image, label = run.data.train[0][:2]  # as stored: what a sample read moves
    return {"compute_s": statistics.fmean(s - w - c for s, w, c, _ in kept),
            "backward_s": statistics.fmean(b for *_, b in kept), "exchange_s": statistics.fmean(c for *_, c, _ in kept),
            "data_s": statistics.fmean(w for _, w, *_ in kept), "batch": run.hp.minibatch_size,
            "grad_bytes": sum(p.numel() * p.element_size() for p in trainable),
            "model_bytes": sum(t.numel() * t.element_size() for t in floats),
            "sample_bytes": int(image.nbytes + label.nbytes), "loader_workers": run.hp.loader_workers,
            "train_samples": len(run.data.train)}


def _profile_rank(argv: list[str]) -> None:
    """One rank of :func:`_profile_on_ranks`: ``OUT STEPS JOB [--set=K=V ...]``, started by mpirun. It builds
    its run as a training rank does and writes its figures to OUT/rank-RANK.json."""
    out, steps, job_path, *sets = argv
    job = load_job(job_path, [s.removeprefix("--set=") for s in sets])
    _, run = job.build_run()
    figures = profile_run(run, job.monitoring, int(steps))
    (Path(out) / f"rank-{run.world.rank}.json").write_text(json.dumps(figures))


# --- the link --------------------------------------------------------------------------------------------

PROBE_SIZES = (4, 1 << 20, 16 << 20)  # bytes: latency from the first, bandwidth between the last two
PROBE_ROUNDS = 20


def _probe(rank: int, port: int, out: str) -> None:
    """One of the two processes of :func:`measure_link`: ping-pong every size with gloo send/recv."""
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    one_way = {}
    for size in PROBE_SIZES:
        buf = torch.zeros(max(1, size // 4), dtype=torch.float32)
        times = []
        for i in range(PROBE_ROUNDS + 2):
            start = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if i >= 2:
                times.append((time.perf_counter() - start) / 2)
        one_way[size] = statistics.median(times)
    if rank == 0:
        Path(out).write_text(json.dumps(one_way))
    dist.destroy_process_group()


def measure_link() -> Link:
    """Latency and bandwidth between two local processes over gloo (what ranks on this node use), from
    ping-pong times: latency of the smallest message, bandwidth between the two largest."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "link.json"
        mp.spawn(_probe, args=(port, str(out)), nprocs=2, join=True)  # returns when both have ended
        times = {int(k): v for k, v in json.loads(out.read_text()).items()}
    small, mid, large = PROBE_SIZES
    bandwidth = (large - mid) / max(times[large] - times[mid], 1e-9)
    return Link(times[small], bandwidth, "measured")


def choose_link(name: str, args: ScaleOptions) -> Link:
    """The link ``name`` (``--link``), with ``--bandwidth-gbps`` and ``--latency-us`` overriding its figures."""
    if name == "measured":
        link = measure_link()
    elif name in LINKS:
        link = LINKS[name]
    else:
        raise JobError(option("--link"), f"unknown link '{name}'", did_you_mean(name, [*LINKS, "measured"]))
    if args.bandwidth_gbps is not None:
        link = dataclasses.replace(link, bandwidth=args.bandwidth_gbps / 8 * GB, name="custom")
    if args.latency_us is not None:
        link = dataclasses.replace(link, latency_s=args.latency_us * 1e-6, name="custom")
    return link


# --- R2D2's experiments ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Preset:
    """A setting replayed from published figures instead of a profile: one GPU's whole step (``step_s``,
    the data read included), the minibatch, the parameters (fp32 gradients), the bytes a sample reads."""

    title: str
    step_s: float
    batch: int
    params: int
    sample_bytes: int
    data_path: DataPath
    link: str = "ib-edr"
    bucket_mb: float = 64 * 2**20 / 1e6  # Horovod's tensor fusion threshold, 64 MiB
    ranks_per_node: int = 2
    world_sizes: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 18, 32, 64, 128, 256, 512, 1024)

    def profile(self, data_path: DataPath) -> Profile:
        """The profile whose one-rank step over ``data_path`` is the published one: compute is the step less
        the read; backward is taken as 2/3 of the compute (twice the forward's FLOPs)."""
        compute = self.step_s - data_path.read_s(1, self.ranks_per_node, self.batch * self.sample_bytes)
        return Profile(self.batch, {1: compute}, {1: compute * 2 / 3}, {1: 0.0}, 4 * self.params, 4 * self.params,
                       self.sample_bytes, 0)


def _r2d2(name: str, batch: int, hours: float, epochs: int, params: int, data_path: DataPath) -> Preset:
    """R2D2 on Grid'5000's grele (thesis section 3.4, paper section 4): 2 GTX 1080 Ti per node,
    InfiniBand (taken as EDR, 100 Gb/s: the papers give no rate), Horovod (ring allreduce over Open MPI and
    NCCL, 64 MiB tensor fusion buckets), fp32 gradients. One GPU's step is R2D2's own single-GPU time over
    its steps: every epoch trains the 33,880 BraTS slices (the thesis' left-atrium curves, 512 x 512, match),
    so a step is hours / (epochs * 33,880 / batch). A sample read is a 512 x 512 float32 slice and its
    uint8 label."""
    step = hours * 3600 / (epochs * 33_880 / batch)
    return Preset(f"R2D2 {name}, minibatch {batch} per GTX 1080 Ti, Horovod", step, batch, params, 512 * 512 * 5,
                  data_path)


UNET_PARAMS = 31_030_658  # Ronneberger et al.'s U-Net: autocnnp's unet at depth 5, base_channels 64, 1 in, 2 out
# Long et al.'s FCN-8s: VGG16's 13 convolutions (autocnnp's fcn at width 1, 1 in, 2 out: 14,717,254) plus fc6
# as a 7x7 convolution 512 -> 4096 and fc7 as a 1x1 convolution 4096 -> 4096 (the layers the thesis' transfer
# from a full VGG-16 model brings along)
FCN_PARAMS = 14_717_254 + (7 * 7 * 512 * 4096 + 4096) + (4096 * 4096 + 4096)
PRESETS = {
    # U-Net: minibatch 7, 100 epochs, 21 h 40 min on one GPU (thesis 3.4.2-3.4.3.2); data in each node's RAM
    "r2d2-unet": _r2d2("U-Net", 7, 21 + 40 / 60, 100, UNET_PARAMS, DataPath()),
    # FCN: minibatch 10, 120 epochs, 35 h 40 min on one GPU (thesis 3.4.3.1); every minibatch read over NFS,
    # taken as one 10 GbE NFS server (1.25 GB/s) shared by all ranks, not overlapped with compute
    "r2d2-fcn": _r2d2("FCN-8s", 10, 35 + 40 / 60, 120, FCN_PARAMS, DataPath("nfs", 1.25 * GB)),
}


# --- the command -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ScaleOptions:
    """What ``scale`` predicts (``autocnnp scale``'s options): a job (profiled here) or a preset."""

    job: Path | str | None = None  #: the job file (not with preset)
    sets: tuple[str, ...] = ()  #: overrides of the job, KEY=VALUE
    preset: str | None = None  #: instead of a job: one of PRESETS (R2D2's experiments)
    link: str | None = None  #: one of LINKS or measured (default: measured for a job, the preset's link)
    bandwidth_gbps: float | None = None  #: overrides the link's bandwidth (Gb/s)
    latency_us: float | None = None  #: overrides the link's latency (microseconds)
    data_path: str | None = None  #: ram (default), disk:GBPS or nfs:GBPS
    sample_bytes: int | None = None  #: bytes read per sample (default: the sample's size in memory)
    overlap: float | None = None  #: share of the backward pass the allreduce hides behind (default 1 - 1/buckets)
    bucket_mb: float | None = None  #: gradient bucket in MB (default: the strategy's)
    ranks: str | None = None  #: comma-separated rank counts (default 1, 2, 4, ..., max_ranks and the job's)
    max_ranks: int = 1024
    ranks_per_node: int | None = None  #: default: this machine's slots, its GPUs where it has some
    compute_ms: float | None = None  #: one rank's compute step measured elsewhere (ms)
    speedup_of_gpu: float | None = None  #: the device is this many times faster than this machine's profile
    steps: int = 20  #: timed steps per measurement, after WARMUP_STEPS warm-up steps
    plot: Path | str | None = None  #: write speedup and efficiency to this PNG



def add_commands(sub) -> None:
    s = sub.add_parser("scale", help="predict throughput, speedup and efficiency of the job at 1..1024 ranks",
                       description="Profile one rank's step of the job on this machine (compute with the threads "
                       "a rank gets at each rank count, data time, gradient bytes), combine it with a link and "
                       "the strategy's traffic (ring allreduce overlapped with backward, parameter server, "
                       "federated rounds) and the data path, and print step time, samples/s, speedup and "
                       "efficiency per rank count.")
    s.add_argument("job", nargs="?", help="the XML job file (not with --preset)")
    s.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE", help="override the job")
    s.add_argument("--preset", help="instead of a job: " + ", ".join(PRESETS) + " (R2D2's experiments)")
    s.add_argument("--link", help=f"{', '.join(LINKS)} or measured (gloo between two local processes); "
                   "default measured for a job, the preset's link for a preset")
    s.add_argument("--bandwidth-gbps", type=float, help="link bandwidth in Gb/s (overrides the link's)")
    s.add_argument("--latency-us", type=float, help="link latency in microseconds (overrides the link's)")
    s.add_argument("--data-path", help="ram (default), disk:GBPS (each node's disk) or nfs:GBPS (one server for "
                   "all ranks), bandwidth in GB/s")
    s.add_argument("--sample-bytes", type=int, help="bytes read per sample on the data path (default: the "
                   "sample's size in memory)")
    s.add_argument("--overlap", type=float, help="fraction of the backward pass the allreduce hides behind "
                   "(default: 1 - 1/buckets)")
    s.add_argument("--bucket-mb", type=float, help="gradient bucket in MB (default: the strategy's bucket_cap_mb, "
                   "else ring_allreduce's, as DDP's)")
    s.add_argument("--ranks", help="comma-separated rank counts (default 1, 2, 4, ..., --max-ranks, and the job's)")
    s.add_argument("--max-ranks", type=int, default=ScaleOptions.max_ranks)
    s.add_argument("--ranks-per-node", type=int, help="ranks on one node (default: this machine's slots, "
                   "its GPUs where it has some)")
    s.add_argument("--compute-ms", type=float, help="one rank's compute step measured elsewhere (ms); the backward "
                   "keeps its measured share")
    s.add_argument("--speedup-of-gpu", type=float, metavar="X", help="the device is X times faster than this "
                   "machine's profile (compute divided by X)")
    s.add_argument("--steps", type=int, default=ScaleOptions.steps,
                   help=f"timed steps per measurement (after {WARMUP_STEPS} warm-up steps; default {ScaleOptions.steps})")
    s.add_argument("--plot", metavar="PNG", help="write speedup and efficiency to this PNG")
    s.add_argument("--json", metavar="FILE", help="write inputs and prediction as JSON ('-': standard output)")
    s.set_defaults(func=cmd_scale)


def cmd_scale(args) -> int:
    """Print the prediction; with ``--json -`` standard output is the JSON alone (the rest goes to stderr)."""
    options = options_of(ScaleOptions, args)
    if args.json != "-":
        report = scale(options).jsonable()
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
            print(f"wrote {args.json}")
        return ExitCode.OK
    with contextlib.redirect_stdout(sys.stderr):
        report = scale(options).jsonable()
    print(json.dumps(report, indent=2, default=str))
    return ExitCode.OK


def scale(args: ScaleOptions) -> Report:
    """Profile the job's step here (or take the preset), predict step time, throughput, speedup and efficiency
    at each rank count and print the table; returns the prediction and its inputs."""
    if (args.job is None) == (args.preset is None):
        raise JobError(option("JOB.xml"), "give a job file or --preset, not both and not neither",
                       f"autocnnp scale JOB.xml, or autocnnp scale --preset {next(iter(PRESETS))}")
    world_sizes = _rank_counts(args.ranks, args.max_ranks)
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise JobError(option("--preset"), f"unknown preset '{args.preset}'", did_you_mean(args.preset, PRESETS))
        preset = PRESETS[args.preset]
        data_path = parse_data_path(args.data_path) if args.data_path else preset.data_path
        title, profile, bucket_mb = preset.title, preset.profile(data_path), args.bucket_mb or preset.bucket_mb
        placement = Placement(args.ranks_per_node or preset.ranks_per_node, 1, 1)  # a GPU each: threads do not count
        world_sizes = world_sizes if args.ranks else list(preset.world_sizes)
        traffic = _traffic(Strategy, None, profile)
        link = choose_link(args.link or preset.link, args)
    else:
        job = load_job(args.job, list(args.sets))
        gen = job.generator
        if gen.framework != "torch":
            raise JobError(gen.action("framework").where or gen.spec.where, f"autocnnp scale profiles the torch step; "
                           f"this job trains with {gen.framework}", "profile the same architecture and data with "
                           "--set framework=torch (benchmarks/tensorflow_framework.py compares the two frameworks)")
        data_path = parse_data_path(args.data_path or "ram")
        link = choose_link(args.link or "measured", args)  # before torch fills the cores
        placement = _placement(args.ranks_per_node, job.slurm.cpus_per_task)
        world_sizes = sorted({*world_sizes, gen.ranks}) if not args.ranks else world_sizes
        copies: dict[int, int] = {}  # threads per rank -> the most ranks on one node that get them
        for n in world_sizes:
            threads = placement.threads(n)
            copies[threads] = max(copies.get(threads, 1), min(n, placement.ranks_per_node))
        profile = profile_job(job, copies, args.steps)
        action = gen.action("dist_strategy")
        traffic = _traffic(adopt(action.entry.load(), Strategy), action.config, profile)
        bucket_mb = args.bucket_mb or _bucket_mb(action.config)
        title = (f"{gen.spec.file.name}: {action.entry.name}, {link.name} link, "
                 f"{gen.action('architecture_injection').entry.name}, minibatch {profile.batch} per rank")
    profile = _overridden(profile, args)
    overlap = args.overlap if args.overlap is not None else bucket_overlap(profile.grad_bytes, bucket_mb * 1e6)
    if not 0 <= overlap <= 1:
        raise JobError(option("--overlap"), f"{overlap} is not a fraction", "give a value from 0 to 1")
    rows = predict(profile, traffic, link, world_sizes, placement=placement, data_path=data_path, overlap=overlap)
    print(f"{title}\nlink: latency {link.latency_s * 1e6:.2f} us, bandwidth {link.bandwidth / GB:.3g} GB/s; "
          f"data: {data_path.describe()}; gradients {profile.grad_bytes / 1e6:.3g} MB; overlap {overlap:.2f}; "
          f"{placement.ranks_per_node} ranks per node")
    print(table(rows))
    if args.plot:
        print(f"wrote {plot(rows, Path(args.plot), title)}")
    return Report(title, link, data_path.describe(), overlap, placement, profile, rows)


def _traffic(strategy: type[Strategy], config, profile: Profile):
    """``traffic(n)``: what the strategy sends per step with n ranks."""
    def at(world_size: int) -> Traffic:
        steps = steps_per_epoch(profile.train_samples or 0, shards_of(config, world_size), profile.batch)
        return strategy.traffic(config, grad_bytes=profile.grad_bytes, model_bytes=profile.model_bytes,
                                world_size=world_size, steps_per_epoch=steps)
    return at


def _bucket_mb(config) -> float:
    """The strategy's own bucket size where its Config has one (``bucket_cap_mb``, MiB), else ring_allreduce's
    (DDP's), in MB."""
    if not (dataclasses.is_dataclass(config) and "bucket_cap_mb" in {f.name for f in dataclasses.fields(config)}):
        config = POINT_BY_NAME["dist_strategy"].registry.get("ring_allreduce", None, "torch").config()
    return config.bucket_cap_mb * 2**20 / 1e6


def _placement(ranks_per_node: int | None, cpus_per_task: int) -> Placement:
    """This machine as a node: its cores and slots (or GPUs)."""
    import torch

    cores = usable_cores()
    slots = torch.cuda.device_count() or max(1, cores // cpus_per_task)
    return Placement(ranks_per_node or slots, cores, cpus_per_task)


def _overridden(profile: Profile, args: ScaleOptions) -> Profile:
    """The profile with ``--compute-ms``, ``--speedup-of-gpu`` and ``--sample-bytes`` applied."""
    compute, backward = dict(profile.compute_s), dict(profile.backward_s)
    if args.compute_ms is not None:
        if not args.compute_ms > 0:
            raise JobError(option("--compute-ms"), f"{args.compute_ms} ms is not a step time", "give a positive time")
        backward = {t: args.compute_ms / 1e3 * backward[t] / compute[t] for t in compute}
        compute = dict.fromkeys(compute, args.compute_ms / 1e3)
    if args.speedup_of_gpu is not None:
        if not args.speedup_of_gpu > 0:
            raise JobError(option("--speedup-of-gpu"), f"{args.speedup_of_gpu} is not a speed-up",
                           "give a positive factor")
        compute = {t: s / args.speedup_of_gpu for t, s in compute.items()}
        backward = {t: s / args.speedup_of_gpu for t, s in backward.items()}
    sample_bytes = args.sample_bytes if args.sample_bytes is not None else profile.sample_bytes
    return dataclasses.replace(profile, compute_s=compute, backward_s=backward, sample_bytes=sample_bytes)


def _rank_counts(text: str | None, top: int) -> list[int]:
    if text is None:
        if top < 1:
            raise JobError(option("--max-ranks"), f"{top} ranks", "give 1 or more")
        return powers_of_two(top)
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise JobError(option("--ranks"), f"'{text}' is not a list of rank counts", "write e.g. --ranks 1,2,4,18")
    return sorted(set(counts))


if __name__ == "__main__":
    _profile_rank(sys.argv[1:])
