"""The task's segmentation losses in TensorFlow, as training/losses.py defines them, per sample: logits
``[N, H, W, C]`` and integer targets ``[N, H, W]`` give ``[N]`` (the step averages them over the
minibatch and weighs each rank's share, so ranks decompose exactly as with torch)."""

from __future__ import annotations

import tensorflow as tf


def cross_entropy(logits, target, num_classes: int):
    """Pixel-mean cross-entropy of each sample (binary cross-entropy with logits for one output channel)."""
    if num_classes == 1:
        per_pixel = tf.nn.sigmoid_cross_entropy_with_logits(tf.cast(target, logits.dtype), logits[..., 0])
    else:
        per_pixel = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(target, tf.int32), logits)
    return tf.reduce_mean(per_pixel, axis=[1, 2])


def dice_loss(logits, target, num_classes: int, eps: float = 1e-6):
    """``1 - soft Dice`` of each sample, over the classes present in its target (training/losses.py)."""
    if num_classes == 1:
        probs = tf.sigmoid(logits)
        onehot = tf.cast(target, logits.dtype)[..., None]
    else:
        probs = tf.nn.softmax(logits, axis=-1)
        onehot = tf.one_hot(tf.cast(target, tf.int32), num_classes, dtype=logits.dtype)
    intersection = tf.reduce_sum(probs * onehot, axis=[1, 2])
    truth = tf.reduce_sum(onehot, axis=[1, 2])
    dice = (2 * intersection + eps) / (tf.reduce_sum(probs, axis=[1, 2]) + truth + eps)
    if num_classes == 1:
        return 1 - dice[:, 0]
    present = tf.cast(truth > 0, dice.dtype)
    return 1 - tf.reduce_sum(dice * present, axis=1) / tf.maximum(tf.reduce_sum(present, axis=1), 1.0)


def dice_ce(logits, target, num_classes: int):
    """Sum of :func:`dice_loss` and :func:`cross_entropy`."""
    return dice_loss(logits, target, num_classes) + cross_entropy(logits, target, num_classes)


LOSSES = {"dice": dice_loss, "ce": cross_entropy, "cross_entropy": cross_entropy, "dice_ce": dice_ce}


def get_loss(name: str):
    """The loss registered under ``name`` (the names of training/losses.py)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {sorted(LOSSES)}")
    return LOSSES[name]
