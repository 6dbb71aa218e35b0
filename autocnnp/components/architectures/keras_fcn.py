"""FCN-8s as a Keras 3 model (the tensorflow framework's ``fcn``; parameters as torch's)."""

from __future__ import annotations

import keras

from autocnnp.generator.registry import component

from .fcn import VGG16, Config
from .keras_layers import bilinear_upsampler, conv_norm_relu


@component("fcn", frameworks=("tensorflow",))
def build(config: Config, *, in_channels: int, num_classes: int) -> keras.Model:
    """FCN-8s on a 16-layer VGG-style encoder, transposed-convolution upsampling, as a Keras model."""
    inputs = keras.Input((None, None, in_channels))
    x, pools = inputs, []
    for index, item in enumerate(VGG16):
        if item == "M":
            x = keras.layers.MaxPooling2D(2)(x)
            pools.append(x)
        else:
            x = conv_norm_relu(x, max(1, round(item * config.width)), config.norm, f"encoder{index}")
    pool3, pool4, pool5 = pools[2:]
    score = bilinear_upsampler(num_classes, 2)(keras.layers.Conv2D(num_classes, 1)(pool5))
    score = bilinear_upsampler(num_classes, 2)(keras.layers.Add()([score, keras.layers.Conv2D(num_classes, 1)(pool4)]))
    score = keras.layers.Add()([score, keras.layers.Conv2D(num_classes, 1)(pool3)])
    return keras.Model(inputs, bilinear_upsampler(num_classes, 8)(score), name="fcn")
