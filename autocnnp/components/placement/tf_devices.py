"""Device placement on TensorFlow: which device each rank's replica runs on."""

from __future__ import annotations

import tensorflow as tf

from autocnnp.core.world import World
from autocnnp.generator.registry import component


@component("local_rank", frameworks=("tensorflow",))
def local_rank(*, world: World) -> str:
    """One GPU per local rank (GPU local_rank mod GPUs, the others hidden from this rank); CPU where none."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "/CPU:0"
    tf.config.set_visible_devices([gpus[world.local_rank % len(gpus)]], "GPU")
    return "/GPU:0"


@component("cpu", frameworks=("tensorflow",))
def cpu(*, world: World) -> str:
    """Every rank on the CPU, whatever GPUs exist (they are hidden from TensorFlow)."""
    del world
    tf.config.set_visible_devices([], "GPU")
    return "/CPU:0"
