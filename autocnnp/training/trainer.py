"""The training loop every rank runs. It only calls the generator's actions, in the thesis' order;
which strategy, architecture or dataset is used is decided by the job, never here."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..generator.assemble import Generator
from ..run.manifest import record_run
from . import determinism
from .monitor import DivergenceGuard, Monitor


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
    if hp.optimiser == "adam":
        return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
    return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


@dataclass
class Run:
    """What one rank built from the generator's actions before its first step."""

    gen: Generator
    world: object
    device: torch.device
    hp: object
    task: object
    data: object
    strategy: object
    model: torch.nn.Module
    sampler: object
    loader: DataLoader
    loader_rng: torch.Generator | None
    valid_loader: DataLoader
    policy: object
    checkpoints: object
    state: TrainState
    loss_fn: object
    autocast: object
    scaler: torch.amp.GradScaler  # kept across epochs: fp16 loss scaling adapts over the run
    guard: DivergenceGuard  # kept across epochs: divergence is judged against the run's first loss


def train(gen: Generator, beat=lambda: None) -> dict[str, float]:
    """Run the job on this rank, calling ``beat()`` as it progresses; returns the last epoch's metrics."""
    run = build(gen, beat)
    if run.world.rank == 0 and run.state.epoch > run.hp.start_epoch:
        done = run.state.epoch >= run.hp.end_epoch
        print(f"autocnnp: resumed from {run.checkpoints.latest()} at epoch {run.state.epoch}"
              + (f"; nothing to train (end_epoch is {run.hp.end_epoch}: raise it, or choose another <output> "
                 "to start afresh)" if done else ""), flush=True)
    metrics: dict[str, float] = {}
    with Monitor(gen.output, run.world.rank, run.world.size, gen.monitoring, run.hp.end_epoch, len(run.loader),
                 start_epoch=run.state.epoch) as monitor:
        for epoch in range(run.state.epoch, run.hp.end_epoch):
            metrics = train_epoch(run, epoch, monitor, beat)
    return metrics


def build(gen: Generator, beat) -> Run:
    """Call the generator's actions in the thesis' order: environment, injection, strategy tuning."""
    # The collectives' own timeout backs up run & manage's watchdog (which names the silent rank).
    world = gen.action("communication_init").build(timeout_s=gen.cluster.rank_timeout_s + 30)
    device = gen.action("device_placement").build(world)
    device = gen.action("memory_allocation").build(device)
    # Share this node's cores (those this process may run on) among its ranks.
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, world.local_size)))
    hp = gen.action("hyperparameters_injection").build()
    deterministic = determinism.configure(hp.deterministic)  # fixed threads, deterministic kernels
    task = gen.action("task_definition").build()
    seed_everything(gen.seed)  # identical initial parameters on every rank (DDP broadcasts them too)
    data = gen.action("dataset_injection").build(world=world, seed=gen.seed, cache_dir=gen.output / "cache")
    record_run(gen, world, data, deterministic)  # manifest.json (rank 0): split sizes, augmentation, MPI
    net = gen.action("architecture_injection").build(in_channels=data.in_channels, num_classes=data.num_classes)
    strategy = gen.action("dist_strategy").build(world=world, device=device)
    if hasattr(strategy, "heartbeat"):  # a strategy that blocks outside the step loop (a dedicated server) beats too
        strategy.heartbeat = beat
    if hp.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = strategy.wrap(net)
    optimizer = strategy.wrap_optimizer(make_optimizer(hp, model.parameters()), model)
    sampler = strategy.sampler(data.train, shuffle=True, seed=gen.seed)
    loader_rng = determinism.loader_generator(hp.deterministic)
    loader = DataLoader(data.train, batch_size=hp.minibatch_size, sampler=sampler, drop_last=True,
                        num_workers=hp.loader_workers, pin_memory=device.type == "cuda",
                        persistent_workers=hp.loader_workers > 0, generator=loader_rng,
                        worker_init_fn=determinism.seed_worker if loader_rng is not None else None)
    # Validation shards without padding, so every sample is scored exactly once across the ranks.
    valid_loader = DataLoader(data.valid, batch_size=hp.minibatch_size,
                              sampler=range(world.rank, len(data.valid), world.size))
    if len(loader) == 0:
        raise RuntimeError(f"each rank gets {len(sampler)} training samples, fewer than one minibatch of "
                           f"{hp.minibatch_size}: lower minibatch_size or the parallelism degree")
    # Linear scaling counts the replicas whose gradients make one step (fewer for a dedicated server,
    # one for federated averaging), which a strategy may declare.
    replicas = getattr(strategy, "data_parallel_size", world.size)
    policy = gen.action("lr_policy").build(base_lr=hp.lr, world_size=replicas, steps_per_epoch=len(loader),
                                           total_epochs=hp.end_epoch)
    checkpoints = gen.action("checkpoint").build(directory=gen.output / "checkpoints", rank=world.rank)
    state = TrainState(optimizer, epoch=hp.start_epoch)
    _resume(checkpoints, strategy.unwrap(model), state, policy)
    autocast, scaler = mixed_precision(hp.precision, device)
    guard = DivergenceGuard(gen.monitoring.divergence_factor, gen.monitoring.stop_on_divergence)
    return Run(gen, world, device, hp, task, data, strategy, model, sampler, loader, loader_rng, valid_loader,
               policy, checkpoints, state, task.loss(hp.loss), autocast, scaler, guard)


def train_epoch(run: Run, epoch: int, monitor: Monitor, beat) -> dict[str, float]:
    """One epoch: the steps, the strategy's epoch end, validation, plug-ins, checkpoint."""
    gen, hp, world, state, optimizer = run.gen, run.hp, run.world, run.state, run.state.optimizer
    seed_everything(gen.seed + 1000 * epoch + world.rank)  # RNG state is a function of (seed, epoch, rank)
    run.sampler.set_epoch(epoch)
    determinism.seed_loader(run.loader_rng, gen.seed, epoch, world.rank)
    if hasattr(run.data.train, "set_epoch"):
        run.data.train.set_epoch(epoch)  # epoch-dependent augmentation
    loss_fn, scaler = run.loss_fn, run.scaler
    run.model.train()
    total, count = 0.0, 0
    for step, (x, y) in enumerate(run.loader):
        beat()  # before the step's collectives: a rank stuck elsewhere shows the oldest beat
        for group in optimizer.param_groups:
            group["lr"] = run.policy.lr(epoch, step) * state.lr_scale
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        if hp.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with run.autocast:
            loss = loss_fn(run.model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        run.strategy.after_backward(run.model)
        scaler.step(optimizer)
        scaler.update()
        value = loss.item()
        run.guard.check(value, epoch, step)
        total, count = total + value * len(x), count + len(x)
        monitor.step(epoch, step, value, len(x))
    run.strategy.end_epoch(run.model)
    net = run.strategy.unwrap(run.model)
    metrics = evaluate(net, run.valid_loader, run.task.evaluator(run.data.num_classes), loss_fn, run.device,
                       world, beat)
    loss_sum, n = world.sum([total, count])
    metrics = {"train_loss": loss_sum / max(n, 1), "lr": optimizer.param_groups[0]["lr"], **metrics}
    state.epoch = epoch + 1
    run.checkpoints.callbacks_on_epoch_end(epoch, metrics, state)
    if (feedback := getattr(run.policy, "on_epoch_end", None)) is not None:
        feedback(epoch, metrics)  # an adaptive LR policy (GreScale); metrics are the same on every rank
    beat()
    monitor.epoch_end(epoch, metrics)
    if run.checkpoints.due(epoch, hp.end_epoch - 1):
        saved = _checkpoint_state(net, state, run.checkpoints, gen, world.size, run.policy)
        run.checkpoints.save({**saved, "in_channels": run.data.in_channels, "num_classes": run.data.num_classes},
                             epoch)
    return metrics


def mixed_precision(precision: str, device: torch.device):
    """An autocast context and a gradient scaler (a no-op scaler unless fp16)."""
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    return autocast, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


@torch.no_grad()
def evaluate(model, loader: DataLoader, evaluator, loss_fn, device, world, beat=lambda: None) -> dict[str, float]:
    """SegEval over the whole validation set: confusion matrices are summed across ranks, never scores."""
    model.eval()
    total, count = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total, count = total + loss_fn(logits, y).item() * len(x), count + len(x)
        evaluator.update(logits, y)
        beat()
    evaluator.all_reduce(world.all_reduce)
    loss_sum, n = world.sum([total, count])
    return {"valid_loss": loss_sum / max(n, 1), **evaluator.compute()}


def _checkpoint_state(model, state: TrainState, checkpoints, gen: Generator, world_size: int, policy=None) -> dict:
    policy_state = getattr(policy, "state_dict", None)
    return {"model": model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "optimizer_type": type(state.optimizer).__name__, "epoch": state.epoch,
            "lr_scale": state.lr_scale, "plugins": checkpoints.plugin_state(), "world_size": world_size,
            "seed": gen.seed, "job": str(gen.job.file), "lr_policy": policy_state() if policy_state else None}


def _resume(checkpoints, model, state: TrainState, policy=None) -> None:
    saved = checkpoints.load()
    if saved is None:
        return
    kind = type(state.optimizer).__name__
    if saved.get("optimizer_type", kind) != kind:
        raise RuntimeError(f"the checkpoint in {checkpoints.latest()} was written with the {saved['optimizer_type']} "
                           f"optimiser, the job now asks for {kind}: resume with the same optimiser, or start "
                           f"afresh with another <output> folder or resume=false on the checkpoint action")
    model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.epoch, state.lr_scale = saved["epoch"], saved["lr_scale"]
    checkpoints.load_plugin_state(saved["plugins"])
    if saved.get("lr_policy") is not None and hasattr(policy, "load_state_dict"):
        policy.load_state_dict(saved["lr_policy"])  # the feedback-adjusted schedule goes on
