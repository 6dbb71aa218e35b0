"""Keras 3 building blocks of the built-in networks on the tensorflow framework (NHWC, as TensorFlow
convolves on the CPU), mirroring the torch ones layer for layer."""

from __future__ import annotations

import math

import keras
import numpy as np


def conv_norm_relu(x, channels: int, norm: str, name: str | None = None):
    """3x3 convolution ('same' padding), optional normalisation (torch's epsilon and momentum), ReLU; ``name``
    prefixes its layers' names (``encoder...`` marks the encoder that ``freeze="encoder"`` freezes)."""
    named = (lambda part: f"{name}_{part}") if name else (lambda part: None)
    x = keras.layers.Conv2D(channels, 3, padding="same", use_bias=norm == "none", name=named("conv"))(x)
    if norm == "batch":
        x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=named("norm"))(x)
    elif norm == "instance":  # a group per channel
        x = keras.layers.GroupNormalization(groups=-1, epsilon=1e-5, name=named("norm"))(x)
    elif norm == "group":
        x = keras.layers.GroupNormalization(groups=math.gcd(8, channels), epsilon=1e-5, name=named("norm"))(x)
    return keras.layers.ReLU(name=named("relu"))(x)


def bilinear_upsampler(channels: int, factor: int):
    """Learnable per-class upsampling by ``factor``, initialised to bilinear interpolation."""
    kernel = 2 * factor
    ramp = 1 - np.abs(np.arange(kernel, dtype=np.float32) - (factor - 0.5)) / factor
    weights = np.zeros((kernel, kernel, channels, channels), np.float32)
    for c in range(channels):
        weights[:, :, c, c] = ramp[:, None] * ramp[None, :]
    return keras.layers.Conv2DTranspose(channels, kernel, strides=factor, padding="same", use_bias=False,
                                        kernel_initializer=keras.initializers.Constant(weights))
