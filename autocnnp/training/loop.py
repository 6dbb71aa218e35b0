"""What every framework's training shares: the epoch loop with its checkpoints and stop requests, the
state plug-ins see, metrics summed over ranks, and the model card predict reads. The loop drives a
training/run.py :class:`~autocnnp.training.run.Run`, whose ``steps`` (the framework's part) follow the
:class:`~autocnnp.generator.protocols.TrainingSteps` protocol."""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..core.metrics import LEARNING_RATE, TRAIN_LOSS, VALID_LOSS
from ..core.world import World
from ..data.batches import DeviceBatches
from ..generator.assemble import Generator
from ..generator.protocols import DataBundle
from . import determinism
from .monitor import Monitor, MonitoringConfig, StopRequested

if TYPE_CHECKING:
    from .run import Run


@dataclass
class TrainState:
    """What checkpoint plug-ins may look at and steer (``lr_scale`` multiplies the LR policy)."""

    optimizer: object  # the framework's optimizer (torch.optim.Optimizer, keras.optimizers.Optimizer)
    lr_scale: float = 1.0
    epoch: int = 0


def sum_over_ranks(world: World, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64)."""
    if world.all_reduce is None or world.world_size == 1:
        return list(values)
    return world.all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
            saved = run.snapshot() if due or best else None
            if due:
                run.checkpoints.save(saved, epoch)
            if best:
                run.checkpoints.save_best(saved, epoch, metrics)
            if stop:
                raise StopRequested(f"stopped on request after epoch {epoch + 1} of {run.hp.end_epoch}, "
                                    "with a checkpoint")
    return metrics


def train_epoch(run: Run, epoch: int, monitor: Monitor, beat) -> dict[str, float]:
    """One epoch: the steps, validation, then plug-ins, the LR policy and the monitor see the (all-reduced)
    metrics."""
    world, state, steps = run.world, run.state, run.steps
    begin_epoch(run, epoch)
    total, count = train_steps(run, epoch, monitor, beat)
    net = steps.end_steps()
    evaluator = run.task.evaluator(run.data.num_classes, run.data.class_names, run.regions)
    metrics = evaluate(net, run.valid_loader, evaluator, run.loss_fn, world, beat, run.data.infer)
    loss_sum, n = sum_over_ranks(world, [total, count])
    # every rank's step time (the straggler watch), gathered before the plug-ins' hooks: a rank failing in one leaves
    # its peers writing the epoch's metrics, not blocked in a collective
    rank_step_s = sum_over_ranks(world, [monitor.mean_step_s() if r == world.rank else 0.0
                                         for r in range(world.world_size)])
    metrics = {TRAIN_LOSS: loss_sum / max(n, 1), LEARNING_RATE: steps.current_lr(), **metrics}
    state.epoch = epoch + 1
    run.checkpoints.on_epoch_end(epoch, metrics, state)
    run.policy.on_epoch_end(epoch, metrics)  # an adaptive LR policy (GreScale); metrics are the same on every rank
    beat()
    monitor.epoch_end(epoch, metrics, rank_step_s)
    return metrics


def begin_epoch(run: Run, epoch: int) -> None:
    """What precedes an epoch's first step: the seeds (a function of seed, epoch and rank), the sampler's and
    the loader's epoch, the framework's train mode."""
    gen, world = run.gen, run.world
    seed_everything(gen.seed + 1000 * epoch + world.rank)
    run.sampler.set_epoch(epoch)
    determinism.seed_loader(run.loader_rng, gen.seed, epoch, world.rank)
    run.loader.set_epoch(epoch)  # epoch-dependent augmentation
    run.steps.begin_steps()


def train_steps(run: Run, epoch: int, monitor: Monitor, beat, limit: int | None = None) -> tuple[float, int]:
    """The epoch's optimizer steps (the first ``limit`` of them: ``autocnnp scale`` times these), each reported
    to the monitor with its time and its wait for the minibatch; returns the loss summed over the samples and
    their number."""
    steps, policy, guard, state = run.steps, run.policy, run.guard, run.state
    total, count = 0.0, 0
    last = time.perf_counter()  # the end of the previous step: what follows until the batch is there is waiting
    for step, (x, y) in enumerate(itertools.islice(run.loader, limit)):
        waited = time.perf_counter() - last
        beat()  # before the step's collectives: a rank stuck elsewhere shows the oldest beat
        value = steps.step(x, y, policy.lr(epoch, step) * state.lr_scale)
        guard.check(value, epoch, step)
        total, count = total + value * len(x), count + len(x)
        now = time.perf_counter()
        monitor.step(epoch, step, value, len(x), now - last, waited)
        last = now
    return total, count


@torch.no_grad()
def evaluate(model, loader: DeviceBatches, evaluator, loss_fn, world: World, beat=lambda: None,
             infer=None) -> dict[str, float]:
    """SegEval over the whole validation set: confusion matrices are summed across ranks, never scores.
    ``infer(model, x)`` runs the network on a minibatch (default: ``model(x)``)."""
    model.eval()
    total, count = 0.0, 0
    for x, y in loader:
        logits = model(x) if infer is None else infer(model, x)
        total, count = total + loss_fn(logits, y).item() * len(x), count + len(x)
        evaluator.update(logits, y)
        beat()
    evaluator.all_reduce(world.all_reduce)
    loss_sum, n = sum_over_ranks(world, [total, count])
    return {VALID_LOSS: loss_sum / max(n, 1), **evaluator.compute()}


def model_card(gen: Generator, data: DataBundle) -> dict:
    """What ``autocnnp predict`` needs to rebuild the network and feed it without the job file: the job's part
    (:func:`job_card`) and the data's (:func:`data_card`)."""
    return {**job_card(gen), **data_card(gen, data)}


def job_card(gen: Generator) -> dict:
    """The model card's part that the job alone gives: the job as trained (text and overrides), the framework,
    the architecture and its parameters, and whether it takes 2D slices or 3D patches (``dimension``)."""
    arch = gen.action("architecture_injection")
    return {"job": {"file": str(gen.spec.file), "text": gen.spec.text, "overrides": dict(gen.spec.overrides)},
            "framework": gen.framework, "dimension": gen.dimension,
            "architecture": {"name": arch.entry.name, "file": None if arch.entry.file is None else str(arch.entry.file),
                             "params": arch.recorded()}}


def data_card(gen: Generator, data: DataBundle) -> dict:
    """The model card's part that the data gives: channels, classes and their names, and how a volume becomes
    the model's input (None for a format without volumes; a 3D model's records its patch size, target spacing
    and window overlap)."""
    transform = gen.data_format().volumes()
    return {"in_channels": data.in_channels, "num_classes": data.num_classes,
            "classes": {str(i): name for i, name in enumerate(data.class_names)},
            "input": None if transform is None else transform.card()}
