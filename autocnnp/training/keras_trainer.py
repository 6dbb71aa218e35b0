"""The tensorflow framework's run on every rank: a Keras 3 network on TensorFlow, trained in a custom loop
through the job's KerasStrategy (``model.fit`` cannot take each rank's own batches under
MultiWorkerMirroredStrategy). Everything around the step is torch's: the same sharded, seeded and
augmented minibatches (the CPU data pipeline, handed over as NHWC arrays), the same SegEval code
scoring the validation logits, LR policies, checkpoints (the weights as arrays), monitoring and
training/loop.py's epoch loop: this module supplies only the network, optimizer, step and state I/O
(training/run.py builds the rest). Importing this module imports TensorFlow, with Keras on its backend."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # before TensorFlow is imported

from .keras_backend import import_keras  # noqa: E402

keras = import_keras("tensorflow")  # before TensorFlow, which imports Keras on the backend KERAS_BACKEND names

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ..core.errors import DataError  # noqa: E402
from ..generator.assemble import Generator  # noqa: E402
from ..generator.protocols import ENCODER_PREFIX, KerasStrategy, TrainingSteps  # noqa: E402
from . import determinism, keras_losses, run  # noqa: E402
from .monitor import MonitoringConfig  # noqa: E402
from .pretrained import frozen_summary, loaded_summary, read_pretrained  # noqa: E402
from .run import Backend, Run, network, pretrained  # noqa: E402

POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16"}  # Keras mixed-precision policies of <precision>


class KerasInference(nn.Module):
    """A Keras network seen as a torch module in evaluation mode: NCHW tensors in, NCHW float32 logits out
    (validation and ``autocnnp predict`` score every framework's logits with the same code)."""

    def __init__(self, model: keras.Model) -> None:
        super().__init__()
        self.keras_model = model
        self.forward_fn = Traced(lambda x: tf.cast(model(x, training=False), tf.float32), exact=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward_fn(nhwc(x.detach().float().cpu())).numpy()
        return torch.from_numpy(logits.transpose(0, 3, 1, 2).copy()).to(x.device)


class KerasSteps(TrainingSteps):
    """The tensorflow framework's part of a run: the Keras network, its optimizer, the step as a
    ``tf.function`` (images NHWC, labels) -> this rank's mean loss, and the network as validation scores it."""

    def __init__(self, *, model: keras.Model, optimizer: keras.optimizers.Optimizer, strategy: KerasStrategy,
                 train_step, inference: KerasInference):
        self.model, self.optimizer, self.strategy = model, optimizer, strategy
        self.train_step, self.inference = train_step, inference

    def begin_steps(self) -> None:
        """Nothing: the step function sets Keras' training mode itself."""

    def step(self, x, y, lr: float) -> float:
        """One synchronous step at ``lr`` on this rank's minibatch (NCHW from the data pipeline); its loss."""
        return float(self.train_step(nhwc(x), y.numpy(), np.float32(lr)))

    def end_steps(self) -> KerasInference:
        self.strategy.synchronize(self.model.non_trainable_variables)
        return self.inference

    def current_lr(self) -> float:
        return float(self.optimizer.learning_rate.numpy())

    def state_dict(self) -> dict:
        """The network's and the optimizer's variables as arrays."""
        return {"model": weights_of(self.model), "optimizer": [v.numpy() for v in self.optimizer.variables]}

    def load_state_dict(self, saved: dict | None, source: Path | None) -> None:
        """The network and the optimizer (its step count and moments) from ``saved``, then rank 0's on every rank."""
        if saved is not None:
            load_weights(self.model, saved["model"])
            own = self.optimizer.variables
            if len(own) != len(saved["optimizer"]) or any(tuple(v.shape) != s.shape
                                                          for v, s in zip(own, saved["optimizer"])):
                raise RuntimeError(f"the optimizer state in {source} does not fit this optimizer (its momentum or "
                                   "optimizer changed): resume with the same hyperparameters, or start afresh with "
                                   "another <output> folder or resume=false on the checkpoint action")
            for variable, value in zip(own, saved["optimizer"]):
                variable.assign(value)
        self.strategy.broadcast([*self.model.weights, *self.optimizer.variables])


class KerasBackend(Backend):
    """The tensorflow framework: a Keras network built inside the strategy's scope, the data pipeline on the CPU."""

    name = "tensorflow"

    def configure(self, threads: int, deterministic: bool) -> dict:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        torch.set_num_threads(threads)  # the data pipeline's augmentation
        done = determinism.configure(deterministic)
        if deterministic:
            tf.config.experimental.enable_op_determinism()
            done["tensorflow_op_determinism"] = True
        return done

    def seed(self, seed: int, hp) -> None:
        keras.utils.set_random_seed(seed % 2**32)  # identical initial variables on every rank
        keras.mixed_precision.set_global_policy(POLICIES[hp.precision])  # fp32 or bf16 (the engine refuses fp16)

    def data_device(self, device) -> torch.device:
        return torch.device("cpu")

    def steps(self, gen: Generator, *, world, device, hp, data, strategy: KerasStrategy, loss_fn) -> KerasSteps:
        with strategy.scope():
            net = network(gen, data)
            if not isinstance(net, keras.Model):
                raise TypeError(f"the architecture built a {type(net).__name__}; the tensorflow framework trains "
                                "Keras models (keras.Model): return one from build(), or choose the torch framework")
            pretrained(gen, world, net, load_pretrained)  # before the optimizer sees the trainable variables
            optimizer = make_optimizer(hp)
            optimizer.build(net.trainable_variables)
        step = train_step(net, optimizer, strategy, keras_losses.get_loss(hp.loss), hp.weight_decay, data.num_classes)
        return KerasSteps(model=net, optimizer=optimizer, strategy=strategy, train_step=step,
                          inference=KerasInference(net))


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


def build(gen: Generator, monitoring: MonitoringConfig, *, beat=lambda: None, timeout_s: float) -> Run:
    """One rank's tensorflow run (training/run.py's :func:`~autocnnp.training.run.build`)."""
    return run.build(gen, monitoring, KerasBackend(), beat=beat, timeout_s=timeout_s)


def train_step(model: keras.Model, optimizer, strategy: KerasStrategy, loss_fn, weight_decay: float, num_classes: int):
    """One synchronous step at a learning rate as a ``tf.function`` (images, labels, lr): this rank's loss,
    weighted by its ``share`` of the step, its gradients (plus L2 weight decay, as torch's optimizers add it),
    applied through the strategy."""
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

    def step(images, labels, lr):  # the LR set in the step's graph: no eager op per step
        optimizer.learning_rate.assign(lr)
        return strategy.run(replica_step, images, labels)

    return Traced(step, exact=True)


class Traced:
    """``fn`` of arrays as ``tf.function`` traces, made once and reused by every later epoch, not converted by
    AutoGraph (as Keras' own train step: a Keras model traces its Python control flow itself). ``exact``: one
    trace per shape and dtype of the arguments (the train step: a minibatch has one shape, and a graph of known
    shapes runs faster); otherwise one per rank and dtype, every dimension but the first argument's last (the
    images' channels) left unknown, so validation batches of any size and image size share one trace."""

    def __init__(self, fn, exact: bool) -> None:
        self.fn, self.exact, self.traced = fn, exact, {}

    def __call__(self, *arrays):
        key = tuple((a.shape if self.exact else a.ndim, str(a.dtype)) for a in arrays) + (arrays[0].shape[-1],)
        if key not in self.traced:
            spec = [tf.TensorSpec(a.shape if self.exact else [None] * a.ndim, tf.as_dtype(a.dtype)) for a in arrays]
            spec[0] = tf.TensorSpec(spec[0].shape[:-1] + [arrays[0].shape[-1]], spec[0].dtype)
            self.traced[key] = tf.function(self.fn, input_signature=spec, autograph=False)
        return self.traced[key](*arrays)

    def experimental_get_tracing_count(self) -> int:
        """How many times ``fn`` was traced (as ``tf.function``'s)."""
        return sum(f.experimental_get_tracing_count() for f in self.traced.values())


def nhwc(images: torch.Tensor) -> np.ndarray:
    """A minibatch of the data pipeline (NCHW) as the NHWC array Keras convolves."""
    return np.ascontiguousarray(images.numpy().transpose(0, 2, 3, 1))


def inference_module(gen: Generator, weights: dict, *, in_channels: int, num_classes: int) -> KerasInference:
    """The job's Keras network with a checkpoint's ``weights``, for ``autocnnp predict``."""
    net = gen.action("architecture_injection").build(in_channels=in_channels, num_classes=num_classes)
    load_weights(net, weights)
    return KerasInference(net)

