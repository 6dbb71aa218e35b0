"""The training loop every rank runs. It only calls the generator's actions, in the thesis' order, and
the protocols of their implementations (generator/protocols.py): which strategy, architecture or
dataset is used is decided by the job, never here."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DataError
from ..core.files import jsonable
from ..core.metrics import parse_regions
from ..core.processes import default_threads
from ..core.world import World
from ..data.batches import DeviceBatches, batch_loader
from ..generator.assemble import Generator
from ..generator.protocols import Checkpointer, DataBundle, LRPolicy, Strategy
from . import determinism
from .monitor import DivergenceGuard, Monitor, MonitoringConfig, StopRequested
from .pretrained import load_pretrained


@dataclass
class TrainState:
    """What checkpoint plug-ins may look at and steer (``lr_scale`` multiplies the LR policy)."""

    optimizer: torch.optim.Optimizer
    lr_scale: float = 1.0
    epoch: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(hp, params) -> torch.optim.Optimizer:
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
    return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


def sum_over_ranks(world: World, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64)."""
    if world.all_reduce is None or world.world_size == 1:
        return list(values)
    return world.all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()


@dataclass
class Run:
    """What one rank built from the generator's actions before its first step."""

    gen: Generator
    world: World
    device: torch.device
    hp: object
    task: object
    data: DataBundle
    strategy: Strategy
    model: torch.nn.Module
    sampler: object
    loader: DeviceBatches  # the training minibatches, on the device, augmented
    loader_rng: torch.Generator | None
    valid_loader: DeviceBatches
    policy: LRPolicy
    checkpoints: Checkpointer
    state: TrainState
    loss_fn: object
    autocast: object
    scaler: torch.amp.GradScaler  # kept across epochs: fp16 loss scaling adapts over the run
    guard: DivergenceGuard  # kept across epochs: divergence is judged against the run's first loss
    determinism: dict  # what deterministic mode set (for the manifest)
    resumed_from: Path | None  # the checkpoint this run continued from
    regions: dict[str, tuple[int, ...]]  # groups of classes scored as one (<monitoring> regions)
    card: dict  # what predict needs to rebuild and feed the network (model_card)


def build(gen: Generator, monitoring: MonitoringConfig, *, beat=lambda: None, timeout_s: float) -> Run:
    """Call the generator's actions in the thesis' order: environment, injection, strategy tuning.
    ``timeout_s`` bounds the collectives (a backup of run & manage's watchdog, which names the rank)."""
    world = gen.action("communication_init").build(timeout_s=timeout_s)
    device = gen.action("device_placement").build(world=world)
    device = gen.action("memory_allocation").build(device=device)
    torch.set_num_threads(default_threads(world.local_world_size))  # this node's cores shared among its ranks
    hp = gen.action("hyperparameters_injection").build()
    deterministic = determinism.configure(hp.deterministic)  # fixed threads, deterministic kernels
    task = gen.action("task_definition").build()
    seed_everything(gen.seed)  # identical initial parameters on every rank (DDP broadcasts them too)
    data = gen.data_format().datasets(world=world, seed=gen.seed, cache_dir=gen.rundir.cache)
    net = gen.action("architecture_injection").build(in_channels=data.in_channels, num_classes=data.num_classes)
    if gen.pretrained is not None:  # before any wrapping; a resumed run then loads its own checkpoint over it
        loaded = load_pretrained(net, gen.pretrained.local(gen.rundir), gen.pretrained.freeze)
        if world.rank == 0:
            print(f"autocnnp: pretrained ({gen.pretrained.source}): {loaded}", flush=True)
    strategy = gen.action("dist_strategy").build(world=world, device=device, beat=beat)
    if hp.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = strategy.wrap(net)
    optimizer = strategy.wrap_optimizer(make_optimizer(hp, model.parameters()), model)
    sampler = strategy.sampler(data.train, shuffle=True, seed=gen.seed)
    loader_rng = determinism.loader_generator(hp.deterministic)
    pin = device.type == "cuda"
    loader = DeviceBatches(batch_loader(data.train, sampler, hp.minibatch_size, drop_last=True,
                                        workers=hp.loader_workers, pin_memory=pin, generator=loader_rng,
                                        worker_init_fn=determinism.seed_worker if loader_rng is not None else None),
                           device, data.augment, hp.channels_last)
    # Validation shards without padding, so every sample is scored exactly once across the ranks.
    valid_loader = DeviceBatches(batch_loader(data.valid, range(world.rank, len(data.valid), world.world_size),
                                              hp.minibatch_size, drop_last=False, pin_memory=pin), device,
                                 channels_last=hp.channels_last)
    if len(loader) == 0:
        raise RuntimeError(f"each rank gets {len(sampler)} training samples, fewer than one minibatch of "
                           f"{hp.minibatch_size}: lower minibatch_size or the parallelism degree")
    policy = gen.lr_policy(steps_per_epoch=len(loader), world_size=world.world_size)
    checkpoints = gen.action("checkpoint").build(directory=gen.rundir.checkpoints, rank=world.rank)
    state = TrainState(optimizer, epoch=hp.start_epoch)
    autocast, scaler = mixed_precision(hp.precision, device)
    guard = DivergenceGuard(monitoring.divergence_factor, monitoring.stop_on_divergence)
    resumed_from = _resume(checkpoints, strategy.unwrap(model), state, policy, scaler, guard)
    regions = parse_regions(monitoring.regions, data.class_names)
    try:
        task.evaluator(data.num_classes, data.class_names, regions)
    except ValueError as exc:
        raise DataError(None, f"<monitoring> regions: {exc}", f"use class values of the data's {data.num_classes} "
                        "classes (0 is the background)") from None
    return Run(gen, world, device, hp, task, data, strategy, model, sampler, loader, loader_rng, valid_loader,
               policy, checkpoints, state, task.loss(hp.loss), autocast, scaler, guard, deterministic, resumed_from,
               regions, model_card(gen, data))


def fit(run: Run, monitoring: MonitoringConfig, beat=lambda: None, should_stop=lambda: False,
        trackers=()) -> dict[str, float]:
    """Train ``run`` from its current epoch to the end, calling ``beat()`` as it progresses and reporting
    to ``trackers`` (rank 0); returns the last epoch's metrics. When ``should_stop()`` is true on any
    rank at an epoch's end, every rank saves a checkpoint there and raises StopRequested."""
    if run.world.rank == 0 and run.resumed_from is not None:
        done = run.state.epoch >= run.hp.end_epoch
        print(f"autocnnp: resumed from {run.resumed_from} at epoch {run.state.epoch}"
              + (f"; nothing to train (end_epoch is {run.hp.end_epoch}: raise it, or choose another <output> "
                 "to start afresh)" if done else ""), flush=True)
    metrics: dict[str, float] = {}
    last = run.hp.end_epoch - 1
    with Monitor(run.gen.rundir, run.world.rank, run.world.world_size, monitoring, run.hp.end_epoch,
                 len(run.loader), start_epoch=run.state.epoch, trackers=trackers) as monitor:
        for epoch in range(run.state.epoch, run.hp.end_epoch):
            metrics = train_epoch(run, epoch, monitor, beat)
            stop = epoch < last and sum_over_ranks(run.world, [float(bool(should_stop()))])[0] > 0
            due, best = stop or run.checkpoints.due(epoch, last), run.checkpoints.is_best(metrics)
            saved = checkpoint_state(run.strategy.unwrap(run.model), run) if due or best else None
            if due:
                run.checkpoints.save(saved, epoch)
            if best:
                run.checkpoints.save_best(saved, epoch, metrics)
            if stop:
                raise StopRequested(f"stopped on request after epoch {epoch + 1} of {run.hp.end_epoch}, "
                                    "with a checkpoint")
    return metrics


def train_epoch(run: Run, epoch: int, monitor: Monitor, beat) -> dict[str, float]:
    """One epoch: the steps, the strategy's epoch end, validation, plug-ins and the LR policy's epoch end."""
    gen, world, state, optimizer = run.gen, run.world, run.state, run.state.optimizer
    seed_everything(gen.seed + 1000 * epoch + world.rank)  # RNG state is a function of (seed, epoch, rank)
    run.sampler.set_epoch(epoch)
    determinism.seed_loader(run.loader_rng, gen.seed, epoch, world.rank)
    run.loader.set_epoch(epoch)  # epoch-dependent augmentation
    run.model.train()
    total, count = 0.0, 0
    last = time.perf_counter()  # the end of the previous step: what follows until the batch is there is waiting
    for step, (x, y) in enumerate(run.loader):
        waited = time.perf_counter() - last
        beat()  # before the step's collectives: a rank stuck elsewhere shows the oldest beat
        for group in optimizer.param_groups:
            group["lr"] = run.policy.lr(epoch, step) * state.lr_scale
        with run.autocast:
            loss = run.loss_fn(run.model(x), y)
        optimizer.zero_grad()
        run.scaler.scale(loss).backward()
        run.strategy.after_backward(run.model)
        run.strategy.step(optimizer, run.scaler)
        value = loss.item()
        run.guard.check(value, epoch, step)
        total, count = total + value * len(x), count + len(x)
        now = time.perf_counter()
        monitor.step(epoch, step, value, len(x), now - last, waited)
        last = now
    run.strategy.end_epoch(run.model)
    net = run.strategy.unwrap(run.model)
    evaluator = run.task.evaluator(run.data.num_classes, run.data.class_names, run.regions)
    metrics = evaluate(net, run.valid_loader, evaluator, run.loss_fn, world, beat)
    loss_sum, n = sum_over_ranks(world, [total, count])
    metrics = {"train_loss": loss_sum / max(n, 1), "lr": optimizer.param_groups[0]["lr"], **metrics}
    state.epoch = epoch + 1
    run.checkpoints.on_epoch_end(epoch, metrics, state)
    run.policy.on_epoch_end(epoch, metrics)  # an adaptive LR policy (GreScale); metrics are the same on every rank
    beat()
    monitor.epoch_end(epoch, metrics)
    return metrics


def mixed_precision(precision: str, device: torch.device):
    """An autocast context and a gradient scaler (a no-op scaler unless fp16)."""
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    return autocast, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


@torch.no_grad()
def evaluate(model, loader: DeviceBatches, evaluator, loss_fn, world: World, beat=lambda: None) -> dict[str, float]:
    """SegEval over the whole validation set: confusion matrices are summed across ranks, never scores."""
    model.eval()
    total, count = 0.0, 0
    for x, y in loader:
        logits = model(x)
        total, count = total + loss_fn(logits, y).item() * len(x), count + len(x)
        evaluator.update(logits, y)
        beat()
    evaluator.all_reduce(world.all_reduce)
    loss_sum, n = sum_over_ranks(world, [total, count])
    return {"valid_loss": loss_sum / max(n, 1), **evaluator.compute()}


def model_card(gen: Generator, data: DataBundle) -> dict:
    """What ``autocnnp predict`` needs to rebuild the network and feed it without the job file: the job as
    trained (text and overrides), the architecture and its parameters, the classes and their names, and
    how a volume becomes the model's input (None for a format without volumes)."""
    arch = gen.action("architecture_injection")
    transform = gen.data_format().volumes()
    params = jsonable(arch.config) if arch.config is not None else {s.name: s.text for s in arch.settings}
    return {"job": {"file": str(gen.job.file), "text": gen.job.text, "overrides": dict(gen.job.overrides)},
            "architecture": {"name": arch.entry.name, "file": None if arch.entry.file is None else str(arch.entry.file),
                             "params": params},
            "in_channels": data.in_channels, "num_classes": data.num_classes,
            "classes": {str(i): name for i, name in enumerate(data.class_names)},
            "input": None if transform is None else transform.card()}


def checkpoint_state(net: torch.nn.Module, run: Run) -> dict:
    """What a checkpoint holds: the network, the optimizer, the epoch, the policy's and plug-ins' states,
    and what predict needs to rebuild the network (``model_card``)."""
    state = run.state
    return {"model": net.state_dict(), "optimizer": state.optimizer.state_dict(),
            "optimizer_type": type(state.optimizer).__name__, "epoch": state.epoch, "lr_scale": state.lr_scale,
            "plugins": run.checkpoints.plugin_state(), "world_size": run.world.world_size, "seed": run.gen.seed,
            "job": str(run.gen.job.file), "lr_policy": run.policy.state_dict(),
            "grad_scaler": run.scaler.state_dict(), "divergence_reference": run.guard.reference,
            "in_channels": run.data.in_channels, "num_classes": run.data.num_classes, "model_card": run.card}


def _resume(checkpoints: Checkpointer, model, state: TrainState, policy: LRPolicy, scaler: torch.amp.GradScaler,
            guard: DivergenceGuard) -> Path | None:
    """Load the latest checkpoint into the model, optimizer, state, policy, loss scaler and divergence guard
    (judged against the first loss of the whole run, not of this start); the file it came from."""
    saved = checkpoints.load()
    if saved is None:
        return None
    kind = type(state.optimizer).__name__
    if saved.get("optimizer_type", kind) != kind:
        raise RuntimeError(f"the checkpoint in {checkpoints.latest()} was written with the {saved['optimizer_type']} "
                           f"optimizer, the job now asks for {kind}: resume with the same optimizer, or start "
                           f"afresh with another <output> folder or resume=false on the checkpoint action")
    model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.epoch, state.lr_scale = saved["epoch"], saved["lr_scale"]
    checkpoints.load_plugin_state(saved["plugins"])
    if saved.get("lr_policy"):
        policy.load_state_dict(saved["lr_policy"])  # the feedback-adjusted schedule goes on
    if saved.get("grad_scaler"):
        scaler.load_state_dict(saved["grad_scaler"])
    guard.reference = saved.get("divergence_reference", guard.reference)
    return checkpoints.latest()
