"""One rank's training run, whatever the framework: :func:`build` calls the generator's actions once, in
the thesis' order (environment, injection, strategy tuning), and keeps what they built in a :class:`Run`.
A framework (trainer.py: torch, keras_trainer.py: TensorFlow) supplies a :class:`Backend`: its threads
and seeds, and its part of the run (network, optimizer, step and state I/O), the
:class:`~autocnnp.generator.protocols.TrainingSteps` that loop.py's epoch loop drives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..core.errors import DataError
from ..core.metrics import LEARNING_RATE, LOSSES, parse_regions
from ..core.processes import default_threads
from ..core.world import World
from ..data.batches import DeviceBatches, EpochIndices, batch_loader
from ..generator.assemble import Generator
from ..generator.protocols import Checkpointer, DataBundle, LRPolicy, Strategy, TrainingSteps
from . import determinism, virtual
from .loop import TrainState, model_card, seed_everything
from .monitor import DivergenceGuard, MonitoringConfig


@dataclass(kw_only=True)
class Run:
    """What one rank built from the generator's actions before its first step; ``steps`` is the framework's
    part. The manifest and trackers read ``world``, ``data``, ``state``, ``loader``, ``determinism`` and
    ``resumed_from``."""

    gen: Generator
    world: World
    device: object  # where the network trains: a torch.device, a TensorFlow device name
    hp: object
    task: object
    data: DataBundle
    strategy: Strategy
    sampler: object
    loader: DeviceBatches  # the training minibatches, augmented, on the device the step takes them from
    loader_rng: torch.Generator | None
    valid_loader: DeviceBatches
    policy: LRPolicy
    checkpoints: Checkpointer
    state: TrainState
    loss_fn: object  # the task's torch loss (validation scores every framework's logits with it)
    guard: DivergenceGuard  # kept across epochs: divergence is judged against the run's first loss
    determinism: dict  # what deterministic mode set (for the manifest)
    resumed_from: Path | None  # the checkpoint this run continued from
    regions: dict[str, tuple[int, ...]]  # groups of classes scored as one (<monitoring> regions)
    card: dict  # what predict needs to rebuild and feed the network (model_card)
    steps: TrainingSteps

    def snapshot(self) -> dict:
        """What a checkpoint holds: the framework's network and optimizer state, then :meth:`common_state`."""
        return {**self.steps.state_dict(), **self.common_state()}

    def common_state(self) -> dict:
        """The epoch, the policy's and plug-ins' states, and what predict needs to rebuild the network
        (``model_card``)."""
        state = self.state
        return {"optimizer_type": type(state.optimizer).__name__, "epoch": state.epoch, "lr_scale": state.lr_scale,
                "plugins": self.checkpoints.plugin_state(),
                "world_size": self.world.world_size * self.gen.virtual_ranks,
                "seed": self.gen.seed, "job": str(self.gen.spec.file), "lr_policy": self.policy.state_dict(),
                "divergence_reference": self.guard.reference, "in_channels": self.data.in_channels,
                "num_classes": self.data.num_classes, "model_card": self.card}


class Backend:
    """What a framework supplies to :func:`build`, called in this order: ``configure`` (threads and
    deterministic mode), ``seed`` (after the shared seeds, before the data), ``steps`` (its network,
    optimizer and step); ``data_device`` is where the data pipeline puts the minibatches."""

    name: ClassVar[str]  # the framework's name, as checkpoints record it

    def configure(self, threads: int, deterministic: bool) -> dict:
        """Give each rank ``threads`` CPU threads and switch deterministic mode on if asked; what was set."""
        raise NotImplementedError

    def seed(self, seed: int, hp) -> None:
        """Seed the framework's own random generators (the shared ones are seeded already)."""

    def data_device(self, device):
        """The torch device the minibatches are put on."""
        return device

    def steps(self, gen: Generator, *, world: World, device, hp, data: DataBundle, strategy: Strategy,
              loss_fn) -> TrainingSteps:
        """The network (:func:`network`, started from :func:`pretrained` weights), its optimizer and step."""
        raise NotImplementedError


def build(gen: Generator, monitoring: MonitoringConfig, backend: Backend, *, beat=lambda: None,
          timeout_s: float) -> Run:
    """Call the generator's actions in the thesis' order; the strategy is created before anything else is
    computed, as TensorFlow requires (its collectives are configured at start-up). ``timeout_s`` bounds the
    collectives (a backup of run & manage's watchdog, which names the rank)."""
    world = gen.action("communication_init").build(timeout_s=timeout_s)
    device = gen.action("memory_allocation").build(device=gen.action("device_placement").build(world=world))
    hp = gen.action("hyperparameters_injection").build()
    deterministic = backend.configure(default_threads(world.local_world_size), hp.deterministic)
    strategy = gen.action("dist_strategy").build(world=world, device=device, beat=beat)
    task = gen.action("task_definition").build()
    seed_everything(gen.seed)  # identical initial parameters on every rank
    backend.seed(gen.seed, hp)
    data = gen.data_format().datasets(world=world, seed=gen.seed, cache_dir=gen.rundir.cache)
    loss_fn = task.loss(hp.loss)
    steps = backend.steps(gen, world=world, device=device, hp=hp, data=data, strategy=strategy, loss_fn=loss_fn)
    sampler = virtual.sampler(strategy, data.train, world, gen.virtual_ranks, hp.minibatch_size, shuffle=True,
                              seed=gen.seed)
    if getattr(data.train, "epoch_indexed", False):  # items drawn afresh each epoch (random patches)
        sampler = EpochIndices(sampler, len(data.train))
    loader_rng = determinism.loader_generator(hp.deterministic)
    loader, valid_loader = loaders(data, sampler, hp, world, backend.data_device(device), loader_rng,
                                   micro_batches=gen.virtual_ranks)
    policy = gen.lr_policy(steps_per_epoch=len(loader), world_size=world.world_size * gen.virtual_ranks)
    checkpoints = gen.action("checkpoint").build(directory=gen.rundir.checkpoints, rank=world.rank)
    state = TrainState(steps.optimizer, epoch=hp.start_epoch)
    guard = DivergenceGuard(monitoring.divergence_factor, monitoring.stop_on_divergence)
    saved = checkpoints.load()
    resumed_from = None if saved is None else restore(saved, checkpoints, state, policy, guard, backend.name)
    steps.load_state_dict(saved, resumed_from)
    return Run(gen=gen, world=world, device=device, hp=hp, task=task, data=data, strategy=strategy, sampler=sampler,
               loader=loader, loader_rng=loader_rng, valid_loader=valid_loader, policy=policy, checkpoints=checkpoints,
               state=state, loss_fn=loss_fn, guard=guard, determinism=deterministic, resumed_from=resumed_from,
               regions=checked_regions(task, data, monitoring, checkpoints), card=model_card(gen, data), steps=steps)


def network(gen: Generator, data: DataBundle):
    """The job's architecture built for the data's channels and classes."""
    return gen.action("architecture_injection").build(in_channels=data.in_channels, num_classes=data.num_classes)


def pretrained(gen: Generator, world: World, net, load):
    """Start ``net`` from the job's pretrained weights, if any, with the framework's ``load(net, checkpoint,
    freeze)``, whose result says what it did (rank 0 prints it); None without pretrained weights."""
    if gen.pretrained is None:
        return None
    loaded = load(net, gen.pretrained.local(gen.rundir), gen.pretrained.freeze)
    if world.rank == 0:
        print(f"autocnnp: pretrained ({gen.pretrained.source}): {loaded}", flush=True)
    return loaded


def loaders(data: DataBundle, sampler, hp, world: World, device, loader_rng,
            micro_batches: int = 1) -> tuple[DeviceBatches, DeviceBatches]:
    """This rank's training minibatches (its shard, augmented, on ``device``; ``micro_batches`` minibatches
    in each, one per virtual rank) and validation minibatches."""
    pin = device.type == "cuda"
    loader = DeviceBatches(batch_loader(data.train, sampler, hp.minibatch_size * micro_batches, drop_last=True,
                                        workers=hp.loader_workers, pin_memory=pin, generator=loader_rng,
                                        worker_init_fn=determinism.seed_worker if loader_rng is not None else None),
                           device, data.augment, hp.channels_last)
    # Validation shards without padding, so every sample is scored exactly once across the ranks.
    valid_loader = DeviceBatches(batch_loader(data.valid, range(world.rank, len(data.valid), world.world_size),
                                              data.valid_batch_size or hp.minibatch_size, drop_last=False,
                                              pin_memory=pin), device,
                                 None, hp.channels_last)
    if len(loader) == 0:
        raise RuntimeError(f"each rank gets {len(sampler) // micro_batches} training samples, fewer than one minibatch of "
                           f"{hp.minibatch_size}: lower minibatch_size or the parallelism degree")
    return loader, valid_loader


def checked_regions(task, data: DataBundle, monitoring: MonitoringConfig,
                    checkpoints: Checkpointer) -> dict[str, tuple[int, ...]]:
    """The ``<monitoring> regions`` scored as one, checked against the data's classes; the metrics the
    checkpointer reads (``best_metric``) checked against those every epoch reports. Before training."""
    regions = parse_regions(monitoring.regions, data.class_names)
    try:
        evaluator = task.evaluator(data.num_classes, data.class_names, regions)
    except ValueError as exc:
        raise DataError(None, f"<monitoring> regions: {exc}", f"use class values of the data's {data.num_classes} "
                        "classes (0 is the background)") from None
    checkpoints.check_metrics({*evaluator.names(), *LOSSES, LEARNING_RATE})
    return regions


def restore(saved: dict, checkpoints: Checkpointer, state: TrainState, policy: LRPolicy, guard: DivergenceGuard,
            framework: str) -> Path:
    """Continue from ``saved`` (the network and optimizer are the framework's part): the epoch, the plug-ins,
    the feedback-adjusted schedule, and the divergence reference (the first loss of the whole run, not of
    this start). Refuses a checkpoint of another framework or optimizer. Returns the checkpoint's file."""
    trained = (saved.get("model_card") or {}).get("framework", "torch")
    if trained != framework:
        raise RuntimeError(f"the checkpoint in {checkpoints.latest()} was written by a {trained} run, the job now "
                           f"trains with {framework}: resume with the framework it was trained with, or start "
                           "afresh with another <output> folder or resume=false on the checkpoint action")
    kind = type(state.optimizer).__name__
    if saved.get("optimizer_type", kind) != kind:
        raise RuntimeError(f"the checkpoint in {checkpoints.latest()} was written with the {saved['optimizer_type']} "
                           f"optimizer, the job now asks for {kind}: resume with the same optimizer, or start "
                           f"afresh with another <output> folder or resume=false on the checkpoint action")
    state.epoch, state.lr_scale = saved["epoch"], saved["lr_scale"]
    checkpoints.load_plugin_state(saved["plugins"])
    if saved.get("lr_policy"):
        policy.load_state_dict(saved["lr_policy"])
    guard.reference = saved.get("divergence_reference", guard.reference)
    return checkpoints.latest()
