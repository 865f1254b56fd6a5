"""Steps under a `tf.distribute` strategy: the loss one replica differentiates, logs the strategy can
reduce, and the collectives that keep the quantizer's codebook the same on every replica."""

from __future__ import annotations

import tensorflow as tf
from keras import ops


def step_logs(results: dict) -> dict:
    """A train or test step's logs, in the shape the running distribution strategy can reduce.

    Keras 3 reduces multi-worker logs with reduce(MEAN, axis=0), which fails on scalars
    (tensorflow/tensorflow#72388): there each value gets one axis of length 1.
    """
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return {name: ops.reshape(value, (1,)) for name, value in results.items()}
    return results


def replica_loss(optimizer, loss):
    """The loss one replica differentiates: gradients are summed over replicas, so each contributes
    loss / replicas, scaled by the optimizer (a LossScaleOptimizer under mixed_float16 scales it and
    unscales the gradients; any other optimizer leaves it as it is)."""
    return optimizer.scale_loss(loss / tf.distribute.get_strategy().num_replicas_in_sync)


def all_reduce_sum(value):
    """Sum over replicas inside a tf.distribute replica context; identity otherwise."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def broadcast_from_first_replica(value):
    """Replica 0's `value` on every replica (so random draws agree across replicas)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    is_first = tf.cast(tf.equal(context.replica_id_in_sync_group, 0), value.dtype)
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value * is_first)
