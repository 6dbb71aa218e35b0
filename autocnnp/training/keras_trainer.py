"""The tensorflow framework's run on every rank: a Keras 3 network on TensorFlow, trained in a custom loop
through the job's KerasStrategy (``model.fit`` cannot take each rank's own batches under
MultiWorkerMirroredStrategy). Everything around the step is torch's: the same sharded, seeded and
augmented minibatches (the CPU data pipeline, handed over as NHWC arrays), the same SegEval code
scoring the validation logits, LR policies, checkpoints (the weights as arrays), monitoring and
training/loop.py's epoch loop. Importing this module imports TensorFlow, with Keras on its backend."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

os.environ["KERAS_BACKEND"] = "tensorflow"  # before Keras is imported (this module is imported by tensorflow jobs only)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ..core.errors import DataError  # noqa: E402
from ..core.processes import default_threads  # noqa: E402
from ..core.world import World  # noqa: E402
from ..data.batches import DeviceBatches  # noqa: E402
from ..generator.assemble import Generator  # noqa: E402
from ..generator.protocols import Checkpointer, DataBundle, KerasStrategy, LRPolicy  # noqa: E402
from . import determinism, keras_losses  # noqa: E402
from .loop import (  # noqa: E402
    TrainState,
    checked_regions,
    common_state,
    loaders,
    model_card,
    restore,
    seed_everything,
)
from .monitor import DivergenceGuard, MonitoringConfig  # noqa: E402
from .pretrained import frozen_summary, loaded_summary, read_pretrained  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise RuntimeError(f"Keras was imported with the {keras.backend.backend()!r} backend before this tensorflow job "
                       "built its network: set KERAS_BACKEND=tensorflow, or import nothing that imports keras first")

POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16"}  # Keras mixed-precision policies of <precision>


class KerasInference(nn.Module):
    """A Keras network seen as a torch module in evaluation mode: NCHW tensors in, NCHW float32 logits out
    (validation and ``autocnnp predict`` score every framework's logits with the same code)."""

    def __init__(self, model: keras.Model) -> None:
        super().__init__()
        self.keras_model = model
        self.forward_fn = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32), reduce_retracing=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward_fn(nhwc(x.detach().float().cpu())).numpy()
        return torch.from_numpy(logits.transpose(0, 3, 1, 2).copy()).to(x.device)


@dataclass
class KerasRun:
    """What one rank built from the generator's actions before its first step (fields as torch's Run)."""

    gen: Generator
    world: World
    device: str
    hp: object
    task: object
    data: DataBundle
    strategy: KerasStrategy
    model: keras.Model
    sampler: object
    loader: DeviceBatches
    loader_rng: torch.Generator | None
    valid_loader: DeviceBatches
    policy: LRPolicy
    checkpoints: Checkpointer
    state: TrainState
    loss_fn: object  # the task's torch loss, for validation
    train_step: object  # tf.function (images NHWC, labels) -> this rank's mean loss
    inference: KerasInference  # the network as validation scores it
    guard: DivergenceGuard
    determinism: dict
    resumed_from: Path | None
    regions: dict[str, tuple[int, ...]]
    card: dict

    def begin_steps(self) -> None:
        """Nothing: the step function sets Keras' training mode itself."""

    def step(self, x, y, lr: float) -> float:
        """One synchronous step at ``lr`` on this rank's minibatch (NCHW from the data pipeline); its loss."""
        self.state.optimizer.learning_rate.assign(lr)
        return float(self.train_step(nhwc(x), y.numpy()))

    def end_steps(self) -> KerasInference:
        self.strategy.synchronize(self.model.non_trainable_variables)
        return self.inference

    def current_lr(self) -> float:
        return float(self.state.optimizer.learning_rate.numpy())

    def snapshot(self) -> dict:
        """The network's and the optimizer's variables as arrays, and training/loop.py's common state."""
        return {"model": weights_of(self.model), "optimizer": [v.numpy() for v in self.state.optimizer.variables],
                **common_state(self)}


def weights_of(model: keras.Model) -> dict[str, np.ndarray]:
    """Every variable of ``model`` (BatchNorm statistics included), in the model's order, keyed ``N:path``
    (sub-models may repeat a path)."""
    return {f"{i}:{v.path}": np.array(v.numpy()) for i, v in enumerate(model.weights)}


def load_weights(model: keras.Model, weights: dict[str, np.ndarray]) -> None:
    """Set ``model``'s variables from :func:`weights_of`, in order (Keras numbers unnamed layers per process,
    so paths may differ); another count or shape of variables is an error."""
    if len(model.weights) != len(weights):
        raise ValueError(f"the saved weights hold {len(weights)} variables, the network has {len(model.weights)}")
    for variable, (path, value) in zip(model.weights, weights.items()):
        if tuple(variable.shape) != value.shape:
            raise ValueError(f"the saved weight {path} has shape {value.shape}, the network's {variable.path} "
                             f"{tuple(variable.shape)}")
        variable.assign(value)


ENCODER_PREFIX = "encoder"  # freeze="encoder" freezes the top-level layers whose names start with it


def load_pretrained(model: keras.Model, checkpoint: Path, freeze: str) -> str:
    """Copy the variables of ``checkpoint`` (a tensorflow run's) whose path and shape match into ``model``;
    with ``freeze="encoder"`` the layers named ``encoder...`` whose variables were all loaded stop training
    (a frozen BatchNormalization runs in inference mode: it keeps its moving statistics), while a layer
    newly initialised in the encoder (a first layer for other input channels) trains. Says what it did."""
    saved: dict[tuple[str, int], np.ndarray] = {}
    for key, value in read_pretrained(checkpoint, "tensorflow").items():
        path = key.partition(":")[2]  # 'N:path' (weights_of); a path repeats in sub-models: count them
        saved[(path, sum(p == path for p, _ in saved))] = value
    loaded, fresh, seen = set(), [], {}
    for variable in model.weights:
        key = (variable.path, seen.setdefault(variable.path, 0))
        seen[variable.path] += 1
        if key in saved and tuple(variable.shape) == saved[key].shape:
            variable.assign(saved[key])
            loaded.add(id(variable))
        else:
            fresh.append(variable.path)
    summary = loaded_summary(checkpoint, len(loaded), len(model.weights), fresh)
    if freeze != "encoder":
        return summary
    encoder = [layer for layer in model.layers if layer.name.startswith(ENCODER_PREFIX) and layer.weights]
    if not encoder:
        raise DataError(checkpoint, f"freeze=encoder, but the Keras model {model.name} has no layer named "
                        f"'{ENCODER_PREFIX}...'", f"name its encoder layers {ENCODER_PREFIX}_..., or use freeze=none")
    frozen = [layer for layer in encoder if all(id(v) in loaded for v in layer.weights)]
    frozen_size = _size(v for layer in frozen for v in layer.trainable_weights)
    for layer in frozen:
        layer.trainable = False
    norms = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in frozen)
    return summary + frozen_summary(frozen_size, norms, _size(v for layer in encoder for v in layer.trainable_weights))


def _size(variables) -> int:
    return sum(int(np.prod(v.shape)) for v in variables)


def make_optimizer(hp) -> keras.optimizers.Optimizer:
    """Adam or SGD as torch's (Adam's epsilon 1e-8; weight decay is added to the gradients by the step, the
    L2 of torch's optimizers, not Keras' decoupled one)."""
    if hp.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=hp.lr, epsilon=1e-8)
    return keras.optimizers.SGD(learning_rate=hp.lr, momentum=hp.momentum)


def build(gen: Generator, monitoring: MonitoringConfig, *, beat=lambda: None, timeout_s: float) -> KerasRun:
    """Call the generator's actions in the thesis' order; the tf.distribute strategy is created before any
    TensorFlow operation, as TensorFlow requires (its collectives are configured at start-up)."""
    world = gen.action("communication_init").build(timeout_s=timeout_s)
    device = gen.action("device_placement").build(world=world)
    device = gen.action("memory_allocation").build(device=device)
    threads = default_threads(world.local_world_size)  # this node's cores shared among its ranks
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    torch.set_num_threads(threads)  # the data pipeline's augmentation
    hp = gen.action("hyperparameters_injection").build()  # precision: fp32 or bf16 (the engine refuses fp16)
    deterministic = determinism.configure(hp.deterministic)
    if hp.deterministic:
        tf.config.experimental.enable_op_determinism()
        deterministic["tensorflow_op_determinism"] = True
    strategy = gen.action("dist_strategy").build(world=world, device=device, beat=beat)
    task = gen.action("task_definition").build()
    seed_everything(gen.seed)
    keras.utils.set_random_seed(gen.seed % 2**32)  # identical initial variables on every rank
    keras.mixed_precision.set_global_policy(POLICIES[hp.precision])
    data = gen.data_format().datasets(world=world, seed=gen.seed, cache_dir=gen.rundir.cache)
    with strategy.scope():
        net = gen.action("architecture_injection").build(in_channels=data.in_channels, num_classes=data.num_classes)
        if not isinstance(net, keras.Model):
            raise TypeError(f"the architecture built a {type(net).__name__}; the tensorflow framework trains Keras "
                            "models (keras.Model): return one from build(), or choose the torch framework")
        if gen.pretrained is not None:  # before the optimizer sees the trainable variables
            loaded = load_pretrained(net, gen.pretrained.local(gen.rundir), gen.pretrained.freeze)
            if world.rank == 0:
                print(f"autocnnp: pretrained ({gen.pretrained.source}): {loaded}", flush=True)
        optimizer = make_optimizer(hp)
        optimizer.build(net.trainable_variables)
    sampler = strategy.sampler(data.train, shuffle=True, seed=gen.seed)
    loader_rng = determinism.loader_generator(hp.deterministic)
    loader, valid_loader = loaders(data, sampler, hp, world, torch.device("cpu"), loader_rng)
    policy = gen.lr_policy(steps_per_epoch=len(loader), world_size=world.world_size)
    checkpoints = gen.action("checkpoint").build(directory=gen.rundir.checkpoints, rank=world.rank)
    state = TrainState(optimizer, epoch=hp.start_epoch)
    guard = DivergenceGuard(monitoring.divergence_factor, monitoring.stop_on_divergence)
    resumed_from = _resume(checkpoints, net, state, policy, guard)
    strategy.broadcast([*net.weights, *optimizer.variables])
    regions = checked_regions(task, data, monitoring, checkpoints)
    step = train_step(net, optimizer, strategy, keras_losses.get_loss(hp.loss), hp.weight_decay, data.num_classes)
    return KerasRun(gen, world, device, hp, task, data, strategy, net, sampler, loader, loader_rng, valid_loader,
                    policy, checkpoints, state, task.loss(hp.loss), step, KerasInference(net), guard, deterministic,
                    resumed_from, regions, model_card(gen, data))


def train_step(model: keras.Model, optimizer, strategy: KerasStrategy, loss_fn, weight_decay: float, num_classes: int):
    """One synchronous step as a ``tf.function``: this rank's loss, weighted by its ``share`` of the step, its
    gradients (plus L2 weight decay, as torch's optimizers add it), applied through the strategy."""
    variables = model.trainable_variables

    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            logits = tf.cast(model(images, training=True), tf.float32)
            loss = tf.reduce_mean(loss_fn(logits, labels, num_classes))
            weighted = loss * strategy.share
        grads = strategy.gradients(tape, weighted, variables)
        if weight_decay:
            grads = [g + (weight_decay * strategy.share) * tf.cast(v, g.dtype) for g, v in zip(grads, variables)]
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    return tf.function(lambda images, labels: strategy.run(replica_step, images, labels), reduce_retracing=True)


def nhwc(images: torch.Tensor) -> np.ndarray:
    """A minibatch of the data pipeline (NCHW) as the NHWC array Keras convolves."""
    return np.ascontiguousarray(images.numpy().transpose(0, 2, 3, 1))


def inference_module(gen: Generator, weights: dict, *, in_channels: int, num_classes: int) -> KerasInference:
    """The job's Keras network with a checkpoint's ``weights``, for ``autocnnp predict``."""
    net = gen.action("architecture_injection").build(in_channels=in_channels, num_classes=num_classes)
    load_weights(net, weights)
    return KerasInference(net)


def _resume(checkpoints: Checkpointer, model: keras.Model, state: TrainState, policy: LRPolicy,
            guard: DivergenceGuard) -> Path | None:
    """Load the latest checkpoint into the network, the optimizer (its step count and moments), the state,
    policy and divergence guard; the file it came from."""
    saved = checkpoints.load()
    if saved is None:
        return None
    resumed_from = restore(saved, checkpoints, state, policy, guard, "tensorflow")
    load_weights(model, saved["model"])
    own = state.optimizer.variables
    if len(own) != len(saved["optimizer"]) or any(tuple(v.shape) != s.shape for v, s in zip(own, saved["optimizer"])):
        raise RuntimeError(f"the optimizer state in {resumed_from} does not fit this optimizer (its momentum or "
                           "optimizer changed): resume with the same hyperparameters, or start afresh with another "
                           "<output> folder or resume=false on the checkpoint action")
    for variable, value in zip(own, saved["optimizer"]):
        variable.assign(value)
    return resumed_from
