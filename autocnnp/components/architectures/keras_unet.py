"""2D U-Net as a Keras 3 model (the tensorflow framework's ``unet``; parameters as torch's)."""

from __future__ import annotations

import keras

from autocnnp.generator.registry import component

from .keras_layers import conv_norm_relu
from .unet import Config


@component("unet", frameworks=("tensorflow",))
def build(config: Config, *, in_channels: int, num_classes: int) -> keras.Model:
    """2D U-Net (Ronneberger et al.) with configurable depth and width, as a Keras model (NHWC logits)."""
    channels = [config.base_channels * 2**level for level in range(config.depth)]
    inputs = keras.Input((None, None, in_channels))
    x, skips = inputs, []
    for level, c in enumerate(channels):
        if level:
            x = keras.layers.MaxPooling2D(2)(x)
        x = conv_norm_relu(conv_norm_relu(x, c, config.norm, f"encoder{level}_0"), c, config.norm, f"encoder{level}_1")
        skips.append(x)
    skips.pop()
    for level in reversed(range(config.depth - 1)):
        up = keras.layers.Conv2DTranspose(channels[level], 2, strides=2)(x)
        x = keras.layers.Concatenate()([skips.pop(), up])
        x = conv_norm_relu(conv_norm_relu(x, channels[level], config.norm), channels[level], config.norm)
    return keras.Model(inputs, keras.layers.Conv2D(num_classes, 1)(x), name="unet")
