"""Segmentation network architectures (each module exposes ``build``)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from autocnnp.generator.registry import ARCHITECTURES


@dataclass
class UNetConfig:
    depth: int = field(default=4, metadata={"min": 1, "max": 8})
    base_channels: int = field(default=32, metadata={"min": 1})
    norm: Literal["batch", "group", "none"] = "batch"


@dataclass
class FCNConfig:
    width: float = field(default=1.0, metadata={"min": 0.01})
    norm: Literal["batch", "group", "none"] = "none"


@dataclass
class KerasConfig:
    """A Keras 3 model file (``<CNN_archi><path>model.keras</path>`` selects this entry)."""

    path: Path | None = field(default=None, metadata={"must_exist": True})

    def __post_init__(self):
        if self.path is None:
            raise ValueError("the keras architecture needs <param name=\"path\">model.keras</param> "
                             "(or write <CNN_archi><path>model.keras</path></CNN_archi>)")


ARCHITECTURES.register("unet", "autocnnp.components.architectures.unet:build", UNetConfig,
                       "2D U-Net (Ronneberger et al.) with configurable depth and width")
ARCHITECTURES.register("fcn", "autocnnp.components.architectures.fcn:build", FCNConfig,
                       "FCN-8s on a 16-layer VGG-style encoder, transposed-convolution upsampling")
ARCHITECTURES.register("keras", "autocnnp.components.architectures.keras_model:build", KerasConfig,
                       "a Keras 3 model file (.keras) trained on Keras' torch backend as a torch module")
