"""Memory allocation on TensorFlow (set before its runtime starts, as TensorFlow requires)."""

from __future__ import annotations

import tensorflow as tf

from autocnnp.generator.registry import component


@component("soft_placement", frameworks=("tensorflow",))
def soft_placement(*, device: str) -> str:
    """tf.config.set_soft_device_placement: an op with no kernel on the placed device runs on the CPU."""
    tf.config.set_soft_device_placement(True)
    return device


@component("allow_growth", aliases=("expandable_segments",), frameworks=("tensorflow",))
def allow_growth(*, device: str) -> str:
    """GPU memory grows on demand (tf.config.experimental.set_memory_growth) instead of all taken at start."""
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
    return device
