"""The torch framework's run on every rank. It only calls the generator's actions, in the thesis' order,
and the protocols of their implementations (generator/protocols.py): which strategy, architecture or
dataset is used is decided by the job, never here. The epoch loop is training/loop.py's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.processes import default_threads
from ..core.world import World
from ..data.batches import DeviceBatches
from ..generator.assemble import Generator
from ..generator.protocols import Checkpointer, DataBundle, LRPolicy, Strategy
from . import determinism
from .loop import (
    TrainState,
    checked_regions,
    common_state,
    loaders,
    model_card,
    restore,
    seed_everything,
)
from .monitor import DivergenceGuard, MonitoringConfig
from .precision import mixed_precision
from .pretrained import Transfer, load_pretrained


def make_optimizer(hp, params) -> torch.optim.Optimizer:
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
    return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


def checkpoint_bytes(gen) -> int:
    """About the bytes of one checkpoint of the job, at least: the network's tensors built on the meta device
    (nothing allocated; one input channel, two classes) and the optimiser's state (Adam two tensors per
    weight, SGD with momentum one); 0 for a network that cannot be built so."""
    try:
        with torch.device("meta"):
            net = gen.action("architecture_injection").build(in_channels=1, num_classes=2)
        tensors = net.state_dict().values()
        weights = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    except Exception:  # a user's network that needs real tensors to build: an estimate refuses nothing
        return 0
    hp = gen.hyperparameters
    slots = 2 if hp.optimizer == "adam" else 1 if hp.momentum else 0
    return sum(t.numel() * t.element_size() for t in tensors) + slots * weights


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
    transfer: Transfer | None = None  # the pretrained weights it started from, and what of them is frozen

    def begin_steps(self) -> None:
        self.model.train()
        if self.transfer is not None:  # frozen norm layers keep their statistics, also after validation
            self.transfer.keep_frozen(self.strategy.unwrap(self.model))

    def step(self, x, y, lr: float) -> float:
        """One optimizer step at ``lr``: forward under autocast, backward through the loss scaler, the strategy's
        hooks; this rank's loss."""
        optimizer = self.state.optimizer
        for group in optimizer.param_groups:
            group["lr"] = lr
        with self.autocast:
            loss = self.loss_fn(self.model(x), y)
        optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.strategy.after_backward(self.model)
        self.strategy.step(optimizer, self.scaler)
        return loss.item()

    def end_steps(self) -> torch.nn.Module:
        self.strategy.end_epoch(self.model)
        return self.strategy.unwrap(self.model)

    def current_lr(self) -> float:
        return self.state.optimizer.param_groups[0]["lr"]

    def snapshot(self) -> dict:
        return checkpoint_state(self.strategy.unwrap(self.model), self)


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
    transfer = None
    if gen.pretrained is not None:  # before any wrapping; a resumed run then loads its own checkpoint over it
        transfer = load_pretrained(net, gen.pretrained.local(gen.rundir), gen.pretrained.freeze)
        if world.rank == 0:
            print(f"autocnnp: pretrained ({gen.pretrained.source}): {transfer.summary}", flush=True)
    strategy = gen.action("dist_strategy").build(world=world, device=device, beat=beat)
    if hp.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = strategy.wrap(net)
    optimizer = strategy.wrap_optimizer(make_optimizer(hp, model.parameters()), model)
    sampler = strategy.sampler(data.train, shuffle=True, seed=gen.seed)
    loader_rng = determinism.loader_generator(hp.deterministic)
    loader, valid_loader = loaders(data, sampler, hp, world, device, loader_rng)
    policy = gen.lr_policy(steps_per_epoch=len(loader), world_size=world.world_size)
    checkpoints = gen.action("checkpoint").build(directory=gen.rundir.checkpoints, rank=world.rank)
    state = TrainState(optimizer, epoch=hp.start_epoch)
    autocast, scaler = mixed_precision(hp.precision, device)
    guard = DivergenceGuard(monitoring.divergence_factor, monitoring.stop_on_divergence)
    resumed_from = _resume(checkpoints, strategy.unwrap(model), state, policy, scaler, guard)
    regions = checked_regions(task, data, monitoring, checkpoints)
    return Run(gen, world, device, hp, task, data, strategy, model, sampler, loader, loader_rng, valid_loader,
               policy, checkpoints, state, task.loss(hp.loss), autocast, scaler, guard, deterministic, resumed_from,
               regions, model_card(gen, data), transfer)



def checkpoint_state(net: torch.nn.Module, run: Run) -> dict:
    """What a checkpoint holds: the network, the optimizer, the fp16 loss scaler and training/loop.py's
    common state."""
    return {"model": net.state_dict(), "optimizer": run.state.optimizer.state_dict(),
            "grad_scaler": run.scaler.state_dict(), **common_state(run)}


def _resume(checkpoints: Checkpointer, model, state: TrainState, policy: LRPolicy, scaler: torch.amp.GradScaler,
            guard: DivergenceGuard) -> Path | None:
    """Load the latest checkpoint into the model, optimizer, state, policy, loss scaler and divergence guard;
    the file it came from."""
    saved = checkpoints.load()
    if saved is None:
        return None
    resumed_from = restore(saved, checkpoints, state, policy, guard, "torch")
    model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if saved.get("grad_scaler"):
        scaler.load_state_dict(saved["grad_scaler"])
    return resumed_from
