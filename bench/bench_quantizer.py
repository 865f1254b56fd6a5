"""The quantizer layer alone (nearest code + EMA update, one training call) against the
one-hot reference most tutorials write: one-hot encodings, quantized = onehot @ E,
counts = sum(onehot), sums = onehot^T @ z.

    python bench/bench_quantizer.py [--batch 64] [--grid 16]
"""

from __future__ import annotations

import argparse

import tensorflow as tf  # noqa: E402
from common import report, timed

from vqvae_class_keras import VectorQuantizerEMA  # noqa: E402


class OneHotReference(tf.Module):
    """Textbook EMA vector quantizer (same math, dense one-hot products)."""

    def __init__(self, num_embeddings, embedding_dim, decay=0.99, epsilon=1e-5):
        self.k, self.decay, self.epsilon = num_embeddings, decay, epsilon
        self.embeddings = tf.Variable(tf.random.normal((num_embeddings, embedding_dim)))
        self.cluster_size = tf.Variable(tf.ones((num_embeddings,)))
        self.embedding_sum = tf.Variable(self.embeddings.read_value())

    def __call__(self, z):
        flat = tf.reshape(z, (-1, z.shape[-1]))
        distances = (
            tf.reduce_sum(flat**2, axis=1, keepdims=True)
            - 2.0 * tf.matmul(flat, self.embeddings, transpose_b=True)
            + tf.reduce_sum(self.embeddings**2, axis=1)
        )
        encodings = tf.one_hot(tf.argmin(distances, axis=1), self.k)
        quantized = tf.matmul(encodings, self.embeddings)
        counts = tf.reduce_sum(encodings, axis=0)
        dw = tf.matmul(encodings, flat, transpose_a=True)
        self.cluster_size.assign(self.decay * self.cluster_size + (1 - self.decay) * counts)
        self.embedding_sum.assign(self.decay * self.embedding_sum + (1 - self.decay) * dw)
        n = tf.reduce_sum(self.cluster_size)
        smoothed = (self.cluster_size + self.epsilon) / (n + self.k * self.epsilon) * n
        self.embeddings.assign(self.embedding_sum / smoothed[:, None])
        quantized = flat + tf.stop_gradient(quantized - flat)
        return tf.reshape(quantized, tf.shape(z))


def rate(layer_call, z, steps=10) -> float:
    step = tf.function(layer_call)

    def run():
        for _ in range(steps):
            out = step(z)
        out.numpy()

    return steps / timed(run, repeats=3)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--grid", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--dim", type=int, default=16)
    args = parser.parse_args()
    rows = []
    for grid in args.grid:
        z = tf.random.normal((args.batch, grid, grid, args.dim))
        for k in (512, 1024, 4096):
            layer = VectorQuantizerEMA(k, args.dim, codebook_init="uniform")
            layer.build(z.shape)
            ours = rate(lambda x: layer(x, training=True)["quantized"], z)
            reference = rate(OneHotReference(k, args.dim), z)
            rows.append(
                {
                    "grid": f"{grid}x{grid}",
                    "K": k,
                    "vectors": args.batch * grid * grid,
                    "ours_calls_per_s": ours,
                    "onehot_calls_per_s": reference,
                    "speedup": ours / reference,
                }
            )
    report("bench_quantizer", rows, {"batch": args.batch, "embedding_dim": args.dim})


if __name__ == "__main__":
    main()
