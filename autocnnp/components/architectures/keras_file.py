"""``<CNN_archi><path>model.keras</path></CNN_archi>``: a Keras 3 model file, trained as a torch module on
the torch framework, as the Keras model it is on the tensorflow framework.

The thesis described its architectures in Keras. Keras 3 on its torch backend builds every layer
as a ``torch.nn.Module`` whose variables are ``torch.nn.Parameter`` objects, so a loaded model is
trained by the torch optimizers and wrapped in DDP like any built-in network: :func:`build` loads
the ``.keras`` file (``keras.saving.load_model(compile=False)``, Keras' safe mode: no Lambda
layers' code is deserialised), checks its input channels and output classes against the data and
returns a :class:`KerasModule` adapter taking and returning NCHW tensors, as the trainer and the
losses expect.

Keras is imported here only (never by ``autocnnp validate``/``plan``), with the framework's backend.

What to know about Keras models here: the model must output logits (no final softmax/sigmoid:
autocnnp's losses apply those themselves); the adapter passes ``training=`` from torch's
``model.train()``/``model.eval()`` so BatchNormalization and Dropout behave as in Keras' ``fit``;
Keras BatchNormalization keeps its moving statistics as non-trainable parameters, so each rank
updates its own (DDP broadcasts them from rank 0 only at start-up); use ``sync_batchnorm`` only
with torch's own normalisation layers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from autocnnp.core.settings import setting
from autocnnp.generator.registry import component
from autocnnp.training.keras_backend import import_keras

_LOGIT_FREE = ("softmax", "log_softmax", "sigmoid")


@dataclass
class Config:
    """``<CNN_archi><path>model.keras</path></CNN_archi>`` selects this entry with the path set."""

    path: Path = setting(must_exist=True, help="the Keras 3 model file (.keras)")


def _data_format(keras, model) -> str:
    """``channels_last`` or ``channels_first``: from the model's own layers, else Keras' setting."""
    for layer in _layers(model):
        fmt = getattr(layer, "data_format", None)
        if fmt in ("channels_last", "channels_first"):
            return fmt
    return keras.config.image_data_format()


def _layers(model):
    for layer in getattr(model, "layers", []):
        yield layer
        if hasattr(layer, "layers"):
            yield from _layers(layer)


def _final_activation(keras, model) -> str | None:
    """The name of a softmax/sigmoid that the model's output goes through last, if any."""
    layers = list(getattr(model, "layers", []))
    if not layers:
        return None
    last = layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return "softmax"
    name = getattr(getattr(last, "activation", None), "__name__", None)
    return name if name in _LOGIT_FREE else None


def _device_scope(device: str):
    return sys.modules["keras"].device(device)


class KerasModule(nn.Module):
    """A Keras model as an ``nn.Module``: NCHW in, NCHW logits out.

    ``keras_model`` is a registered sub-module, so its (Keras-tracked) parameters are what
    ``parameters()``, the optimizers, ``state_dict()`` and DDP see.
    """

    def __init__(self, keras_model, channels_last: bool, path: Path | str = "") -> None:
        super().__init__()
        self.keras_model = keras_model
        self.channels_last = bool(channels_last)
        self.path = str(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)  # NCHW -> NHWC (contiguous when x is in torch's channels_last format)
        # Tensors Keras creates while running go where the batch is (its default is the GPU whenever one exists).
        with _device_scope(str(x.device)):
            y = self.keras_model(x, training=self.training)
        if isinstance(y, (list, tuple)):
            y = y[0]
        return y.permute(0, 3, 1, 2) if self.channels_last else y

    def extra_repr(self) -> str:
        return f"path={self.path!r}, channels_last={self.channels_last}"


@component("keras")
def build(config: Config, *, in_channels: int, num_classes: int) -> KerasModule:
    """A Keras 3 model file (.keras) trained on Keras' torch backend as a torch module.

    The model is loaded and checked against the data (``in_channels``, ``num_classes``)."""
    path = Path(config.path)
    keras = import_keras()
    # Load onto the CPU: the dist_strategy moves the network to the rank's device (Keras' own default
    # device would be cuda:0 for every rank).
    with keras.device("cpu"):
        model = load_checked(keras, path, in_channels, num_classes)
    module = KerasModule(model, _data_format(keras, model) == "channels_last", path)
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError(f"Keras model {path} has no trainable weights visible to torch (is it a Keras 3 model "
                         "saved as .keras?)")
    return module


@component("keras", frameworks=("tensorflow",))
def build_tensorflow(config: Config, *, in_channels: int, num_classes: int):
    """A Keras 3 model file (.keras) trained on Keras' TensorFlow backend as the Keras model it is.

    The model is loaded and checked against the data; it must take channels_last images (TensorFlow
    convolves NHWC on the CPU)."""
    keras = import_keras("tensorflow")
    model = load_checked(keras, Path(config.path), in_channels, num_classes)
    if _data_format(keras, model) != "channels_last":
        raise ValueError(f"Keras model {config.path} is channels_first; the tensorflow framework trains channels_last "
                         "models (batch, H, W, channels): build it with data_format='channels_last'")
    return model


def load_checked(keras, path: Path, in_channels: int, num_classes: int):
    """Load a .keras file (compile=False, safe mode) and check it is a logits network for the data."""
    if not path.is_file():
        raise FileNotFoundError(f"Keras model file {path} does not exist")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:
        raise ValueError(f"cannot load the Keras model {path}: {type(exc).__name__}: {exc}") from exc
    where = f"Keras model {path}"
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"{where} has {len(model.inputs)} input(s) and {len(model.outputs)} output(s); a "
                         "segmentation network needs one image input and one logits output")
    fmt = _data_format(keras, model)
    axis = -1 if fmt == "channels_last" else 1
    in_shape, out_shape = tuple(model.inputs[0].shape), tuple(model.outputs[0].shape)
    if len(in_shape) != 4 or len(out_shape) != 4:
        raise ValueError(f"{where} takes {in_shape} and returns {out_shape}; a 2D segmentation network takes "
                         "(batch, H, W, channels) images and returns (batch, H, W, classes) logits")
    layout = "(batch, H, W, C)" if axis == -1 else "(batch, C, H, W)"
    if in_shape[axis] is not None and in_shape[axis] != in_channels:
        raise ValueError(f"{where} takes images with {in_shape[axis]} channel(s) (input {in_shape}, {layout}), "
                         f"but the data has {in_channels}: build the model with "
                         f"keras.Input(shape=...{in_channels}...) or select other modalities in <data>")
    if out_shape[axis] is not None and out_shape[axis] != num_classes:
        raise ValueError(f"{where} outputs {out_shape[axis]} class(es) (output {out_shape}, {layout}), but the "
                         f"data has {num_classes} classes: make its last layer produce {num_classes} channels")
    final = _final_activation(keras, model)
    if final is not None:
        raise ValueError(f"{where} ends in a {final} activation, but autocnnp's losses and metrics take logits: "
                         "save the model without the final activation (activation=None on the last layer)")
    return model
