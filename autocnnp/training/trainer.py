"""The torch framework's part of the run on every rank: its network, optimizer, step and state I/O.
Everything else, and the generator's actions, are training/run.py's; which strategy, architecture or
dataset is used is decided by the job, never here. The epoch loop is training/loop.py's."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..data.batches import channels_last_network
from ..generator.assemble import Generator
from ..generator.protocols import Strategy, TrainingSteps
from . import determinism, run, virtual
from .monitor import MonitoringConfig
from .precision import mixed_precision
from .pretrained import Transfer, load_pretrained
from .run import Backend, Run, network, pretrained


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


class TorchSteps(TrainingSteps):
    """The torch framework's part of a run: the strategy-wrapped network, its optimizer, the fp16 loss scaler
    (kept across epochs: its scaling adapts over the run) and the pretrained weights' frozen norm layers."""

    def __init__(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, strategy: Strategy, loss_fn,
                 autocast, scaler: torch.amp.GradScaler, transfer: Transfer | None, micro_batches: int = 1):
        self.model, self.optimizer, self.strategy, self.loss_fn = model, optimizer, strategy, loss_fn
        self.autocast, self.scaler, self.transfer = autocast, scaler, transfer
        self.micro_batches = micro_batches  # the virtual ranks this process emulates (training/virtual.py)

    def begin_steps(self) -> None:
        self.model.train()
        if self.transfer is not None:  # frozen norm layers keep their statistics, also after validation
            self.transfer.keep_frozen(self.strategy.unwrap(self.model))

    def step(self, x, y, lr: float) -> float:
        """One optimizer step at ``lr``: :meth:`accumulate` the gradients, then the strategy's hooks; this
        rank's loss (the mean of its virtual ranks')."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad()
        loss = self.accumulate(x, y)
        self.strategy.after_backward(self.model)
        self.strategy.step(self.optimizer, self.scaler)
        return loss

    def accumulate(self, x, y) -> float:
        """Forward under autocast and backward through the loss scaler of each of the ``micro_batches``
        (virtual ranks) parts of the batch, their gradients summed (each loss divided by their number) and
        exchanged by the last backward only; BatchNorm's running statistics stay the first part's."""
        k = self.micro_batches
        total = 0.0
        with virtual.first_statistics(self.model, k) as after_first:
            for i, (xm, ym) in enumerate(zip(x.chunk(k), y.chunk(k))):
                with self.strategy.accumulating(self.model) if i < k - 1 else contextlib.nullcontext():
                    with self.autocast:
                        loss = self.loss_fn(self.model(xm), ym)
                    self.scaler.scale(loss / k).backward()
                if i == 0:
                    after_first()
                total += loss.item()
        return total / k

    def end_steps(self) -> torch.nn.Module:
        self.strategy.end_epoch(self.model)
        return self.strategy.unwrap(self.model)

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        """The network, the optimizer and the fp16 loss scaler."""
        return {"model": self.strategy.unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "grad_scaler": self.scaler.state_dict()}

    def load_state_dict(self, saved: dict | None, source: Path | None) -> None:
        if saved is None:
            return
        self.strategy.unwrap(self.model).load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if saved.get("grad_scaler"):
            self.scaler.load_state_dict(saved["grad_scaler"])


class TorchBackend(Backend):
    """The torch framework: torch modules trained by the job's strategy."""

    name = "torch"

    def configure(self, threads: int, deterministic: bool) -> dict:
        torch.set_num_threads(threads)  # this node's cores shared among its ranks
        return determinism.configure(deterministic)  # fixed threads, deterministic kernels

    def steps(self, gen: Generator, *, world, device, hp, data, strategy: Strategy, loss_fn) -> TorchSteps:
        net = network(gen, data)
        # before any wrapping; a resumed run then loads its own checkpoint over it
        transfer = pretrained(gen, world, net, load_pretrained)
        if hp.channels_last:
            net = channels_last_network(net)
        model = strategy.wrap(net)
        optimizer = strategy.wrap_optimizer(make_optimizer(hp, model.parameters()), model)
        autocast, scaler = mixed_precision(hp.precision, device)
        return TorchSteps(model=model, optimizer=optimizer, strategy=strategy, loss_fn=loss_fn, autocast=autocast,
                          scaler=scaler, transfer=transfer, micro_batches=gen.virtual_ranks)


def build(gen: Generator, monitoring: MonitoringConfig, *, beat=lambda: None, timeout_s: float) -> Run:
    """One rank's torch run (training/run.py's :func:`~autocnnp.training.run.build`)."""
    return run.build(gen, monitoring, TorchBackend(), beat=beat, timeout_s=timeout_s)
