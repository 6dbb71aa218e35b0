"""What the components of the extensible points implement: base classes whose hooks are documented
no-ops, so an implementation overrides only what it changes. The trainer calls these and nothing
else (no probing with ``hasattr``). Nothing here imports torch: tensors appear in annotations only.

How each point's implementation is called is in generator/points.py; a component that declares a
Config receives the bound Config as its first argument (``config``), else ``None``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable


def adopt(impl: Any, protocol: type | None) -> Any:
    """``impl`` seen through ``protocol``: a user class that defines only some of the protocol's methods (it
    fits by its methods, not by deriving from the base class) derives from both, so the hooks it leaves out
    are the protocol's documented defaults; anything else comes back unchanged."""
    if protocol is None or not isinstance(impl, type) or issubclass(impl, protocol):
        return impl
    return type(impl.__name__, (impl, protocol), {"__module__": impl.__module__, "__qualname__": impl.__qualname__,
                                                  "__doc__": impl.__doc__})


def first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join((doc or "").split("\n\n")[0].split())


def summary(obj) -> str:
    """The first paragraph of ``obj``'s docstring."""
    return first_paragraph(inspect.getdoc(obj))


# --- framework ------------------------------------------------------------------------------------------

class Framework:
    """The training framework (``framework``): what builds one rank's run from the generator's actions,
    trains it and turns its checkpoints back into a network.

    Built as ``Framework(config)`` on every rank by run & manage's worker, which calls
    ``build(gen, monitoring, beat=, timeout_s=)`` then ``fit(run, monitoring, beat=, should_stop=,
    trackers=)``; ``autocnnp predict`` calls ``network(gen, weights, in_channels=, num_classes=)`` for
    a torch module that takes and returns NCHW tensors, whatever framework trained it. A run has at least
    ``world``, ``data``, ``state`` (its ``epoch``), ``loader`` (its length: steps per epoch),
    ``determinism`` and ``resumed_from``, which the manifest and trackers read. The built-ins build
    training/run.py's shared run around their :class:`TrainingSteps`.
    """

    def __init__(self, config: Any = None):
        self.config = config

    def build(self, gen, monitoring, *, beat=lambda: None, timeout_s: float):
        raise NotImplementedError

    def fit(self, run, monitoring, *, beat=lambda: None, should_stop=lambda: False, trackers=()) -> dict[str, float]:
        raise NotImplementedError

    def network(self, gen, weights: dict, *, in_channels: int, num_classes: int):
        raise NotImplementedError

    def checkpoint_bytes(self, gen) -> int:
        """About the bytes of one checkpoint of the job, at least (its weights and optimiser state), told in
        the front-end before any rank starts; 0 when it cannot be told cheaply."""
        return 0


class TrainingSteps:
    """A framework's part of one rank's training run: its network, optimizer, step and state I/O. The
    run around it (data, LR policy, checkpoints, metrics, monitoring) is shared by every framework
    (training/run.py), and training/loop.py's epoch loop drives it.

    Every epoch the loop calls ``begin_steps()``, then ``step(x, y, lr)`` for each of this rank's
    minibatches (NCHW images and labels as torch tensors on the run's device), then ``end_steps()``
    for the network validation scores, and ``current_lr()`` for the epoch's metrics. A checkpoint
    holds ``state_dict()`` beside the run's own state; ``load_state_dict(saved, source)`` is called
    once before the first step with the checkpoint the run continues from (None: it starts afresh).
    """

    optimizer: Any  # the framework's optimizer: checkpoint plug-ins see it as ``state.optimizer``

    def begin_steps(self) -> None:
        """The epoch's steps start (the network in training mode); no-op by default."""

    def step(self, x, y, lr: float) -> float:
        """One optimizer step at learning rate ``lr`` on this rank's minibatch; this rank's loss."""
        raise NotImplementedError

    def end_steps(self):
        """The epoch's steps are done: the network to validate, a torch-callable taking NCHW images and
        returning NCHW float logits (the same scoring code serves every framework)."""
        raise NotImplementedError

    def current_lr(self) -> float:
        """The learning rate of the last step."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What a checkpoint holds of the network and the optimizer (``model``, ``optimizer``, ...)."""
        raise NotImplementedError

    def load_state_dict(self, saved: dict | None, source: Path | None) -> None:
        """Continue from ``saved``, a :meth:`state_dict` read from the checkpoint file ``source`` (both None
        for a fresh start); afterwards every rank holds the same network and optimizer."""
        raise NotImplementedError


# --- architecture_injection ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SizeRule:
    """The input sizes an architecture takes: every spatial side (H and W; D, H and W in 3D) a multiple of
    ``multiple`` and at least ``minimum``. The engine checks the data's input size against it before
    anything starts (``validate`` included).

    ``dimensions`` says whether it takes 2D slices or 3D patches (None: either). ``deepest_voxels``: the voxels its
    deepest level must hold at least (the sides each divided by ``multiple``, multiplied): 2 where it normalises
    each sample there over its voxels (instance norm: one value has no variance), ``reason`` saying so.

    An architecture declares its rule in one of two ways: its Config defines ``input_sizes(self) ->
    SizeRule`` (the built-ins: a U-Net of depth d takes multiples of 2^(d-1)), or a user file, an entry point's
    object or its class sets ``input_sizes = {"multiple": 16, "minimum": 16}`` (a literal: a file is read,
    not run, to validate a job; an int is the multiple). An architecture that declares nothing takes any size.
    """

    multiple: int = 1
    minimum: int = 1
    dimensions: int | None = None  #: the spatial dimensions it takes: 2 (slices) or 3 (patches); None: either
    deepest_voxels: int = 1  #: the voxels the deepest level (each side / multiple) holds at least
    reason: str = ""  #: why deepest_voxels is more than 1

    @classmethod
    def parse(cls, value: Any) -> SizeRule:
        """A declared rule: a SizeRule, a dict of its fields or an int (the multiple); ValueError otherwise."""
        if isinstance(value, SizeRule):
            return value
        fields = {"multiple": value} if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(fields, dict) or not set(fields) <= {"multiple", "minimum", "dimensions", "deepest_voxels"} or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in fields.values()) \
                or fields.get("dimensions", 2) not in (2, 3):
            raise ValueError(f"input_sizes = {value!r} is no size rule: write an int (the multiple) or "
                             '{"multiple": M, "minimum": N, "dimensions": 2 or 3, "deepest_voxels": V} with positive '
                             "integers")
        return cls(**fields)

    def takes(self, side: int) -> bool:
        return side >= self.minimum and side % self.multiple == 0

    def deepest(self, sides: tuple[int, ...]) -> tuple[int, ...]:
        """The sides of the deepest level of an input of ``sides`` (sides it takes)."""
        return tuple(side // self.multiple for side in sides)

    def nearest(self, side: int) -> list[int]:
        """The sides it takes nearest to ``side``: the largest below it (if any) and the smallest above."""
        lowest = -(-self.minimum // self.multiple) * self.multiple
        below = side - side % self.multiple
        above = max(below + self.multiple, lowest)
        return ([below] if below >= lowest else []) + [above]

    def describe(self) -> str:
        parts = ([f"multiples of {self.multiple}"] if self.multiple > 1 else []) + \
            ([f"at least {self.minimum}"] if self.minimum > 1 else [])
        return " and ".join(parts) or "any size"


ENCODER_PREFIX = "encoder"  # freeze="encoder" on a Keras model: its top-level layers named so


@runtime_checkable
class Encoded(Protocol):
    """An architecture that names its encoder, for ``<CNN_archi pretrained=... freeze="encoder">``: a torch
    network defines ``encoder()`` returning the modules of its encoder (the U-Net's contracting path, the
    FCN's VGG stages), whose loaded weights then get no gradient. A Keras model declares it by layer names
    instead: its top-level layers named ``encoder...`` (:data:`ENCODER_PREFIX`)."""

    def encoder(self) -> list: ...


def input_sizes_of(config: Any, declared: SizeRule | None) -> SizeRule:
    """The rule of an architecture whose bound Config is ``config`` and whose file or object ``declared`` one
    (:class:`SizeRule`); any size when neither says."""
    method = getattr(config, "input_sizes", None)
    return SizeRule.parse(method()) if callable(method) else declared or SizeRule()


# --- dist_strategy --------------------------------------------------------------------------------------

@dataclass
class StrategyConfig:
    """Base of a strategy's Config: what is known about the strategy before anything is built."""

    def replicas(self, world_size: int) -> int:
        """Model replicas whose gradients make one optimizer step (the k of the linear scaling rule)."""
        return world_size

    def shards(self, world_size: int) -> int:
        """Parts the training set is split into, one per training rank."""
        return world_size

    def refuses_virtual_ranks(self) -> str | None:
        """Why a process cannot emulate several ranks of this strategy by accumulating their micro-batches'
        gradients into one step (None: it can). By default it can where every rank's gradient makes the one
        step of every rank (replicas and shards = ranks)."""
        if self.replicas(2) != 2 or self.shards(2) != 2:
            return "not every rank's gradient makes each step (a rank that only serves, or steps alone)"
        return None


def replicas_of(config: Any, world_size: int) -> int:
    """:meth:`StrategyConfig.replicas` of a strategy's Config; ``world_size`` for any other (a user strategy's)."""
    return config.replicas(world_size) if isinstance(config, StrategyConfig) else world_size


def shards_of(config: Any, world_size: int) -> int:
    """:meth:`StrategyConfig.shards` of a strategy's Config; ``world_size`` for any other (a user strategy's)."""
    return config.shards(world_size) if isinstance(config, StrategyConfig) else world_size


def steps_per_epoch(samples: int, shards: int, minibatch: int) -> int:
    """Optimizer steps of each rank per epoch: its shard, padded to equal shards as DistributedSampler does,
    in whole minibatches (the last partial one is dropped)."""
    return math.ceil(samples / shards) // minibatch


@dataclass(frozen=True)
class Traffic:
    """What a strategy sends for one optimizer step, as ``autocnnp scale`` models it.

    ``pattern``: ``ring`` (every rank all-reduces ``bytes`` around a ring), ``server`` (every other rank
    pushes ``bytes`` to one server and pulls ``bytes`` back, all through the server's link) or ``none``.
    The exchange happens once every ``every_steps`` steps; ``overlap`` is the fraction of the backward
    pass it can hide behind (None: the model's assumption from the gradient buckets; 0: none, it waits
    for the step). ``workers``: the ranks that compute gradients (their batches make the throughput)."""

    pattern: Literal["ring", "server", "none"]
    bytes: int
    workers: int
    every_steps: float = 1.0
    overlap: float | None = None


class CollectiveWait:
    """Seconds this rank has spent blocked in its strategy's collectives (waiting for the other ranks and
    the transfer), summed over the process: the monitor subtracts them from a step's time to get the rank's
    own work (compute and data), which a straggler stands out in. A strategy times a blocking call with
    ``with collective_wait.blocking():``; one that overlaps the exchange with the backward pass calls
    ``watch(model)`` (each gradient's arrival marks the rank's own work so far) and ``synced()`` once the
    exchanged gradients are there: the time since the last gradient arrived was spent waiting."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._ready: float | None = None
        self._entered = 0.0

    @contextlib.contextmanager
    def blocking(self):
        """Count the time the ``with`` block takes (a blocking collective)."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def enter(self, *_hook_args) -> None:
        """A blocking collective starts (usable as a module hook, as are :meth:`leave` and :meth:`synced`)."""
        self._entered = time.perf_counter()

    def leave(self, *_hook_args) -> None:
        """The collective :meth:`enter` announced is done."""
        self.seconds += time.perf_counter() - self._entered

    def watch(self, model) -> None:
        """Mark the time each of ``model``'s gradients is accumulated (the last one ends the backward pass)."""
        for param in model.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(self._gradient_ready)

    def _gradient_ready(self, _param) -> None:
        self._ready = time.perf_counter()

    def synced(self, *_hook_args) -> None:
        """The exchange that followed the backward pass is done: count the time since its last gradient."""
        if self._ready is not None:
            self.seconds += time.perf_counter() - self._ready
            self._ready = None


collective_wait = CollectiveWait()  # this rank's (one rank per process)


class Strategy:
    """A distributed optimizer (``dist_strategy``).

    Built once per rank: ``Strategy(config, world=World, device=torch.device, beat=callable)``.
    The trainer calls ``wrap(model)``, ``wrap_optimizer(optimizer, model)`` and
    ``sampler(dataset, shuffle=, seed=)`` once; every step, after ``loss.backward()``,
    ``after_backward(model)`` then ``step(optimizer, scaler)``; after each epoch's steps, before
    validation, ``end_epoch(model)``; ``unwrap(model)`` wherever it needs the plain network.
    ``beat()`` tells run & manage the rank is alive: call it while blocking outside the step loop.
    Time spent blocked in collectives during the steps is told to :data:`collective_wait`.

    Class attributes the engine reads: ``requires`` (``{action type: (implementations, ...)}`` this
    strategy works with; the engine picks the first when the job leaves that action out) and
    ``launchers`` (how its ranks may be started: ``mpirun``, ``inplace``; ``mpirun`` implies ``srun``).
    """

    requires: ClassVar[dict[str, tuple[str, ...]]] = {}
    launchers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any = None, *, world, device, beat=lambda: None):
        self.config, self.world, self.device, self.beat = config, world, device, beat

    def wrap(self, model):
        """The model to train (moved to the device; wrapped if the strategy needs it)."""
        return model.to(self.device)

    def wrap_optimizer(self, optimizer, model):
        """The optimizer to step (the trainer's own by default)."""
        return optimizer

    def sampler(self, dataset, *, shuffle: bool, seed: int):
        """This rank's samples of ``dataset`` (default: its shard, see :func:`shard_sampler`)."""
        return shard_sampler(dataset, num_replicas=self.world.world_size, rank=self.world.rank, shuffle=shuffle,
                             seed=seed)

    def after_backward(self, model) -> None:
        """Gradients are ready on this rank (no-op by default)."""

    def step(self, optimizer, scaler) -> None:
        """Apply one optimizer step (through the fp16 gradient scaler, a no-op scaler otherwise)."""
        scaler.step(optimizer)
        scaler.update()

    def accumulating(self, model):
        """Context of a backward whose gradients stay on this rank, summed with the next ones before the
        exchange (virtual ranks: every micro-batch but the last); by default nothing changes."""
        del model
        return contextlib.nullcontext()

    def end_epoch(self, model) -> None:
        """The epoch's steps are done; validation and checkpointing follow (no-op by default)."""

    def unwrap(self, model):
        """The plain network inside whatever ``wrap`` returned."""
        return model

    @classmethod
    def traffic(cls, config: Any, *, grad_bytes: int, model_bytes: int, world_size: int, steps_per_epoch: int) -> Traffic:
        """What one step of ``world_size`` ranks sends (``autocnnp scale``): by default a ring allreduce of the
        gradients (``grad_bytes``) every step, overlapped with the backward pass bucket by bucket.
        ``model_bytes`` counts parameters and floating-point buffers; ``steps_per_epoch`` is per rank."""
        del model_bytes, steps_per_epoch
        return Traffic("ring", grad_bytes, shards_of(config, world_size))


class KerasStrategy(Strategy):
    """A distributed optimizer of the tensorflow framework (same names as its torch twins: ``ring_allreduce``).

    Built like every strategy (``device`` is the TensorFlow device name the placement chose). The Keras
    trainer builds the network and optimizer inside ``scope()``; each step runs ``run(step_fn, x, y)`` (in a
    ``tf.function``, returning this rank's result), where ``step_fn`` scales this rank's loss by ``share``,
    takes its gradients with ``gradients(tape, loss, variables)`` and applies them. ``broadcast(variables)``
    gives every rank rank 0's network and optimizer once they are built (or resumed); after each epoch's
    steps, ``synchronize(variables)`` makes the non-trainable ones (BatchNorm statistics) equal on every
    rank before validation and checkpoints. ``sampler`` shards the data as on torch. ``wrap``,
    ``step`` and the other torch hooks are not called."""

    share = 1.0  # the weight of this rank's gradient in one step's: 1/replicas where they are summed, 1 if averaged

    def scope(self):
        """Where the network and optimizer are created (a tf.distribute scope; none by default)."""
        return contextlib.nullcontext()

    def broadcast(self, variables) -> None:
        """Give every rank rank 0's ``variables`` (no-op by default: created equal)."""

    def synchronize(self, variables) -> None:
        """Make ``variables`` equal on every rank (no-op by default)."""

    def run(self, fn, *args):
        """Run one step's ``fn(*args)`` on this rank's replica; its result on this rank."""
        return fn(*args)

    def gradients(self, tape, loss, variables):
        """The gradients this step applies (the tape's own by default)."""
        return tape.gradient(loss, variables)


def shard_sampler(dataset, *, num_replicas: int, rank: int, shuffle: bool, seed: int):
    """Rank ``rank``'s shard of ``dataset`` split over ``num_replicas`` (a DistributedSampler, shuffled by
    ``seed``; short shards are padded, so every rank takes the same number of steps)."""
    from torch.utils.data import DistributedSampler  # torch only where a rank trains

    return DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                              drop_last=False)


# Every built-in strategy runs as MPI ranks: started by mpirun (srun too) or already running in place.
MPI_LAUNCHERS = ("mpirun", "inplace")


# --- lr_policy ------------------------------------------------------------------------------------------

class LRPolicy:
    """A learning-rate policy (``lr_policy``): the learning rate of every optimizer step.

    Built once per run by ``Generator.lr_policy`` (the one builder that training, ``lr-plot`` and
    ``tune`` share): ``Policy(config, base_lr=, replicas=, steps_per_epoch=, total_epochs=)``, where
    ``replicas`` counts the model replicas whose gradients make one step. The trainer asks
    ``lr(epoch, step)`` (both 0-based) before every step, reports every epoch's (all-reduced) metrics
    to ``on_epoch_end`` and checkpoints ``state_dict()``. Subclasses implement :meth:`rate`.
    """

    def __init__(self, config: Any = None, *, base_lr: float, replicas: int, steps_per_epoch: int,
                 total_epochs: int):
        self.config, self.base_lr, self.replicas = config, float(base_lr), int(replicas)
        self.steps_per_epoch, self.total_epochs = int(steps_per_epoch), int(total_epochs)

    def lr(self, epoch: int, step: int) -> float:
        """The learning rate of mini-batch ``step`` of epoch ``epoch`` (both 0-based)."""
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"epoch {epoch}, step {step} is outside the run: epochs count from 0, steps are "
                             f"0..{self.steps_per_epoch - 1} (steps_per_epoch={self.steps_per_epoch})")
        return float(self.rate(epoch * self.steps_per_epoch + step))

    def rate(self, t: int) -> float:
        """The learning rate at global step ``t`` (0-based)."""
        raise NotImplementedError

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        """Feedback after each epoch (no-op by default: a schedule that is a function of the step)."""

    def state_dict(self) -> dict:
        """What a resumed run needs to continue the same schedule (nothing by default)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (no-op by default)."""

    def stages(self) -> list[tuple[float, str]]:
        """``(epoch, name)`` where a stage of the schedule starts, for plots (none by default)."""
        return []

    def describe(self) -> str:
        """One line for people (the class's docstring by default)."""
        return summary(type(self))

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.describe()}>"


# --- checkpoint -----------------------------------------------------------------------------------------

class CheckpointPlugin:
    """User code plugged into the checkpoint action (``<value name="LRSchedule"><path>f.py</path></value>``).

    Every hook is optional: a plain class or function written for this protocol works too (a function
    is its ``on_epoch_end``). ``state`` has ``optimizer``, ``epoch`` and ``lr_scale`` (a multiplier of
    the policy's learning rate that a plug-in may change)."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], state) -> None:
        """After every epoch, on every rank, with the same (all-reduced) metrics."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's state."""


class Checkpointer:
    """The checkpoint action: when the training state is saved, where, and what a run resumes from.

    Built once per rank: ``Checkpointer(config, directory=Path, rank=int, plugins={name: plug-in})``.
    The trainer calls ``load()`` once before training (None: start afresh), after every epoch
    ``on_epoch_end(epoch, metrics, state)`` (which runs the plug-ins), then ``due(epoch, last_epoch)``
    and, when due, ``save(state, epoch)``, and ``save_best(state, epoch, metrics)`` when ``is_best(metrics)``.
    ``latest()`` names the checkpoint a resumed run or ``autocnnp predict`` reads, ``best()`` the best
    one so far (None when the checkpointer keeps none). Plug-in handling is implemented here for every
    checkpointer.
    """

    def __init__(self, config: Any = None, *, directory: Path, rank: int, plugins: dict | None = None):
        self.config, self.directory, self.rank = config, Path(directory), rank
        self.plugins = {name: _as_plugin(name, p) for name, p in (plugins or {}).items()}

    def due(self, epoch: int, last_epoch: int) -> bool:
        raise NotImplementedError

    def save(self, state: dict, epoch: int) -> Path | None:
        raise NotImplementedError

    def load(self) -> dict | None:
        raise NotImplementedError

    def latest(self) -> Path | None:
        raise NotImplementedError

    def check_metrics(self, reported: set[str]) -> None:
        """Before training: the metrics this checkpointer reads are among those every epoch ``reported`` (a
        DataError otherwise); nothing to check by default."""

    def is_best(self, metrics: dict) -> bool:
        """Whether an epoch with these metrics is the best so far (never, for a checkpointer keeping no best)."""
        return False

    def save_best(self, state: dict, epoch: int, metrics: dict) -> Path | None:
        raise NotImplementedError

    def best(self) -> Path | None:
        return None

    def on_epoch_end(self, epoch: int, metrics: dict, state) -> None:
        """Run every plug-in's ``on_epoch_end`` in the job's order."""
        for name, plugin in self.plugins.items():
            try:
                plugin.on_epoch_end(epoch, metrics, state)
            except Exception as exc:
                exc.add_note(f"in checkpoint plug-in '{name}' (on_epoch_end, epoch {epoch})")
                raise

    def plugin_state(self) -> dict:
        """``{plug-in name: state}`` of the plug-ins that keep one."""
        return {name: s for name, plugin in self.plugins.items() if (s := plugin.state_dict())}

    def load_plugin_state(self, saved: dict | None) -> None:
        """Give each plug-in its saved state back (a state for a plug-in not plugged in now is reported)."""
        for name, state in (saved or {}).items():
            if name in self.plugins:
                self.plugins[name].load_state_dict(state)
            else:
                warnings.warn(f"checkpoint holds state for plug-in '{name}', which is not plugged in now; "
                              "its state is ignored", RuntimeWarning, stacklevel=2)


class _Adapted(CheckpointPlugin):
    """A user object or function seen through the plug-in protocol (missing hooks are no-ops)."""

    def __init__(self, obj):
        self.obj = obj
        hook = getattr(obj, "on_epoch_end", None)
        self._on_epoch_end = hook if callable(hook) else obj if callable(obj) else None

    def on_epoch_end(self, epoch, metrics, state) -> None:
        if self._on_epoch_end is not None:
            self._on_epoch_end(epoch, metrics, state)

    def state_dict(self) -> dict:
        method = getattr(self.obj, "state_dict", None)
        return method() if callable(method) else {}

    def load_state_dict(self, state: dict) -> None:
        method = getattr(self.obj, "load_state_dict", None)
        if not callable(method):
            raise TypeError(f"{type(self.obj).__name__} saved a state but has no load_state_dict()")
        method(state)


def _as_plugin(name: str, value) -> CheckpointPlugin:
    """A plug-in instance: a class is instantiated with no arguments (its hooks are all optional); objects
    with hooks and functions are adapted to the protocol."""
    if inspect.isclass(value):
        try:
            value = value()
        except TypeError as exc:
            raise TypeError(f"checkpoint plug-in '{name}': class {value.__name__} must be constructible with no "
                            f"arguments ({exc})") from None
    elif not callable(value) and not any(hasattr(value, h) for h in ("on_epoch_end", "state_dict", "load_state_dict")):
        raise TypeError(f"checkpoint plug-in '{name}' is a {type(value).__name__}: define a class, an object with "
                        "on_epoch_end(epoch, metrics, state), or a function (epoch, metrics, state)")
    return value if isinstance(value, CheckpointPlugin) else _Adapted(value)


# --- dataset_injection ----------------------------------------------------------------------------------

@dataclass
class DataBundle:
    """What a data format hands to the trainer."""

    train: Any  # map-style datasets of (image [C, H, W] float32, label [H, W] int64), [C, D, H, W] / [D, H, W] in 3D;
    valid: Any  # a data.batches.BatchDataset (read_batch) is read a minibatch at a time, any other a sample at a time;
    # a train dataset whose epoch_indexed is true is given item i of epoch e as e * len(train) + i
    in_channels: int
    num_classes: int
    # Random augmentation of the training minibatches on the training device (data.batches.Augment): an object
    # whose augment.batch(images [B, C, H, W] float32, labels [B, H, W] int64, *, epoch, indices) returns
    # (images, labels), indices being the items' positions in ``train``; its repr describes it in the manifest
    augment: Any = None
    class_names: tuple[str, ...] = ()  # the name of every class value (metrics per class are named after them)
    empty_label_cases: tuple[str, ...] = ()  # cases whose label map is background only (for the manifest)
    # validation items per minibatch (None: the job's minibatch_size; 1 for whole volumes of differing shapes)
    valid_batch_size: int | None = None
    # how validation runs the network on a minibatch: infer(model, images) -> logits (None: model(images); e.g. a
    # training.sliding_window.SlidingWindow over whole volumes)
    infer: Any = None
    notes: tuple[str, ...] = ()  # lines said once before the ranks start (e.g. cases padded to the patch)

    @property
    def augmentation(self) -> str:
        """What the augmentation is, for the manifest."""
        return "none" if self.augment is None else repr(self.augment)


@dataclass
class DataCheck:
    """What ``DataFormat.check()`` found: problems (DataErrors: each stops a job) and notes (lines that do
    not, such as a test case training never reads or a label map holding background only)."""

    problems: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class DataFormat:
    """A data format (``<data format="...">``, the dataset_injection point).

    Built as ``Format(config)``: nothing is read until a method asks. Run & manage calls
    ``prepare(seed=, cache_dir=)`` once before starting the ranks; the trainer calls
    ``datasets(world=, seed=, cache_dir=)`` once per rank; ``autocnnp validate --data`` calls
    ``check()``; the manifest hashes ``files()``; ``lr-plot`` asks ``train_samples()``;
    ``autocnnp predict`` asks ``volumes()`` how to turn a volume into model inputs and back, and
    ``volumes_from_card(card, num_classes)`` for the same of a checkpoint's model card.

    Its Config may define ``input_size(self) -> (H, W)`` (``(D, H, W)`` in 3D): the sides of the network's
    inputs, known without reading the data, which the engine checks against the architecture's
    :class:`SizeRule` before anything starts.
    """

    def __init__(self, config: Any = None):
        self.config = config

    def datasets(self, *, world, seed: int, cache_dir: Path) -> DataBundle:
        raise NotImplementedError

    def check(self) -> DataCheck:
        """Every file of the data checked: what stops a job and what does not; nothing by default."""
        return DataCheck()

    def files(self) -> list[Path]:
        """The source files and folders of the data (none for generated data)."""
        return []

    def train_samples(self) -> int | None:
        """Training samples, when known without reading the data (else None)."""
        return None

    def prepare(self, *, seed: int, cache_dir: Path) -> int | None:
        """Check and prepare the data once, in the front-end, before any rank starts (bad data raises a
        DataError); returns the training samples when known. The ranks reuse what it cached."""
        return self.train_samples()

    def volumes(self) -> VolumeTransform | None:
        """How ``autocnnp predict`` turns this format's volumes into model inputs and back, or None for a
        format without volumes."""
        return None

    def volumes_from_card(self, card: dict, num_classes: int | None) -> VolumeTransform | None:
        """The transform whose ``card()`` a checkpoint recorded, for a model of ``num_classes`` classes;
        None (the default) for a format that cannot predict volumes."""
        return None


@dataclass(frozen=True)
class VolumePrediction:
    """What a volume transform's ``predict`` gives for one volume: the argmax ``labels`` ``(X, Y, Z)`` (uint8) on
    the source grid, the class ``probabilities`` ``(K, X, Y, Z)`` there (float32; None unless kept), how many
    ``units`` the network ran over (slices, windows: ``unit``) and the seconds spent preparing the input, in the
    network and bringing the output back to the source grid."""

    labels: Any
    probabilities: Any
    units: int
    unit: str
    prepare_s: float
    network_s: float
    back_s: float


class VolumeTransform:
    """How ``autocnnp predict`` turns a format's volumes into the model's input and the model's output into
    class probabilities on each volume's own grid (the training pre-processing, and its inverse), as
    ``DataFormat.volumes()`` and ``volumes_from_card()`` return it. The decathlon format's are
    :class:`~autocnnp.components.datasets.decathlon.SliceTransform` (2D: slices along the third axis) and
    :class:`~autocnnp.components.datasets.volume3d.PatchTransform` (3D: resampled volumes through a sliding
    window)."""

    num_classes: int | None  # the classes the training data declares, if it declares them
    default_input: Path | None  # what predict reads when given no --input (None: --input is required)

    def card(self) -> dict:
        """What a checkpoint's model card records of this transform (``volumes_from_card`` rebuilds it)."""
        raise NotImplementedError

    def cases(self, source: Path, split: str) -> list:
        """The cases to predict in ``source`` (a dataset's ``split``, a folder or one image): objects with
        ``name`` and ``image`` (a path)."""
        raise NotImplementedError

    def describe(self) -> str:
        """How the model sees a volume, for predict's first line."""
        raise NotImplementedError

    def input_channels(self, channels: int, where: Path) -> int:
        """The channels the model reads of an image stored with ``channels``; a DataError naming ``where`` when
        the image lacks some."""
        raise NotImplementedError

    def predict(self, image, img, where: Path, predictor, keep: bool) -> VolumePrediction:
        """The prediction of a channels-last volume ``image`` ``(X, Y, Z, C)`` as stored, read from ``where`` (its
        NIfTI image ``img``: header, affine), by ``predictor`` (autocnnp.training.predictor.Predictor: the network on
        its device), on the volume's own grid; the probabilities too when ``keep``."""
        raise NotImplementedError


# --- tracker (<monitoring> tracker: several at once) -----------------------------------------------------

@dataclass(frozen=True)
class RunInfo:
    """What a tracker learns of a run when it starts."""

    name: str  # the job file's stem
    rundir: Path
    params: dict[str, str]  # the resolved plan: every action and hyperparameter, flattened
    tags: dict[str, str]  # strategy, degree, launcher, ...
    artifacts: dict[str, Path]  # files logged at the start: the job file, the plan
    first_step: int = 0  # the optimizer step the run starts after (a resumed run: its epochs done x steps)
    parent: Path | None = None  # the run folder of the parent run (run --repeat, tune), if any


class Tracker:
    """Where a run's events go besides ``metrics.csv`` (which every run writes), on rank 0:
    ``Tracker(config, info=RunInfo)``. The monitor calls ``step`` every ``log_every_steps`` optimizer steps,
    ``epoch_end`` after every epoch, ``straggler`` when a rank lags and ``close(status)`` once, with
    ``completed``, ``failed``, ``diverged`` or ``stopped``. A tracker never stops training: a tracker that
    fails keeps what it could not send and says so once."""

    def __init__(self, config: Any = None, *, info: RunInfo):
        self.config, self.info = config, info

    def step(self, global_step: int, loss: float) -> None:
        """The loss of one optimizer step."""

    def epoch_end(self, epoch: int, metrics: dict[str, float], global_step: int) -> None:
        """The metrics of epoch ``epoch`` (0-based), reached at ``global_step``."""

    def straggler(self, epoch: int, rank: int, step_s: float, median_s: float) -> None:
        """Rank ``rank``'s own work per step (``step_s``: its mean step time less the time blocked in collectives)
        stayed above 1.5 x the ranks' median up to epoch ``epoch``."""

    def close(self, status: str) -> None:
        """The run ended (plots, manifest and checkpoints are on disk)."""
