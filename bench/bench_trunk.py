"""Raw training speed of trunk variants: train_step images/s on synthetic 64x64 faces, no input
pipeline, float32, each variant as a ratio to the default trunk measured in the same rounds.
Then where the default's step time goes: forward + backward of each convolution on its own,
with the FLOP rate it reaches.

The variants are measured in interleaved rounds (default, A, B, ..., default, A, B, ...) and
the median of the rounds is reported, so a slow patch of a shared machine hits all of them.

    python bench/bench_trunk.py [--batch 8] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import report, sample_images
from keras import layers  # noqa: E402

from vqvae_faces.config import VQVAEConfig  # noqa: E402
from vqvae_faces.model_settings import build_model  # noqa: E402

VARIANTS = {
    "default": {},
    "1 residual block per side": dict(num_residual_blocks=1),
    "encoder [32, 64], decoder [64, 32]": dict(encoder_filters=[32, 64], decoder_filters=[64, 32]),
    "encoder [64, 128], decoder [128, 64]": dict(encoder_filters=[64, 128], decoder_filters=[128, 64]),
    "residual_hidden_channels 64": dict(residual_hidden_channels=64),
    "embedding_dim 32": dict(embedding_dim=32),
}


def compiled_step(run: VQVAEConfig, images, build=build_model):
    """(train step function, its input batch, parameter count) of run's model, made by `build`
    (`model_settings.build_model`'s signature), warmed up on `images`."""
    keras.utils.set_random_seed(0)
    model = build(run, images.shape[-1], None, seed=0)
    model.build((None,) + images.shape[1:])
    step = tf.function(model.train_step)
    batch = tf.constant(images.astype("float32") / 255.0)
    for _ in range(3):
        step(batch)
    return step, batch, model.count_params()


def images_per_second(step, batch, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        logs = step(batch)
    float(logs["loss"])
    return steps * int(batch.shape[0]) / (time.perf_counter() - start)


def default_trunk_convolutions() -> list[tuple[str, int, keras.layers.Layer, tuple]]:
    """(name, how many the default trunk has, a fresh layer, input shape) for each convolution kind."""
    return [
        ("encoder 4x4/2 conv 3->32 at 64x64", 1, layers.Conv2D(32, 4, strides=2, padding="same"), (64, 64, 3)),
        ("encoder 4x4/2 conv 32->128 at 32x32", 1, layers.Conv2D(128, 4, strides=2, padding="same"), (32, 32, 32)),
        ("residual 3x3 conv 128->32 at 16x16", 4, layers.Conv2D(32, 3, padding="same"), (16, 16, 128)),
        ("residual 1x1 conv 32->128 at 16x16", 4, layers.Conv2D(128, 1), (16, 16, 32)),
        ("decoder 3x3 conv 16->128 at 16x16", 1, layers.Conv2D(128, 3, padding="same"), (16, 16, 16)),
        (
            "decoder 4x4/2 transposed conv 128->32 at 16x16",
            1,
            layers.Conv2DTranspose(32, 4, strides=2, padding="same"),
            (16, 16, 128),
        ),
        (
            "decoder 4x4/2 transposed conv 32->3 at 32x32",
            1,
            layers.Conv2DTranspose(3, 4, strides=2, padding="same"),
            (32, 32, 32),
        ),
    ]


def gradient_step(layer, x):
    """A compiled forward + backward pass of `layer` on `x` (gradients for input and weights)."""

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x)))
        return tape.gradient(loss, [x] + layer.trainable_variables)

    return step


def convolution_rows(batch_size: int, steps: int) -> list[dict]:
    """Forward + backward milliseconds of each convolution of the default trunk, alone."""
    rows = []
    for name, count, layer, shape in default_trunk_convolutions():
        x = tf.constant(np.random.default_rng(0).random((batch_size, *shape), np.float32))
        layer.build(x.shape)

        forward_backward = gradient_step(layer, x)
        forward_backward()
        start = time.perf_counter()
        for _ in range(steps):
            gradients = forward_backward()
        gradients[0].numpy()
        seconds = (time.perf_counter() - start) / steps
        kernel = layer.kernel.shape
        transposed = isinstance(layer, layers.Conv2DTranspose)
        positions = shape[0] * shape[1] if transposed else np.prod(layer.compute_output_shape(x.shape)[1:3])
        macs = int(positions) * int(np.prod(kernel))
        rows.append(
            {
                "convolution": name,
                "in_trunk": count,
                "ms_per_step": 1000 * seconds,
                "ms_all_in_trunk": 1000 * seconds * count,
                "gflop_per_s": 3 * 2 * macs * batch_size / seconds / 1e9,
            }
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for batch_size in args.batch:
        images = sample_images(batch_size, 64)
        steps = {
            name: compiled_step(dataclasses.replace(VQVAEConfig(), **overrides), images)
            for name, overrides in VARIANTS.items()
        }
        rates = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, (step, batch, _) in steps.items():
                rates[name].append(images_per_second(step, batch, args.steps))
        baseline = statistics.median(rates["default"])
        for name, (_, _, parameters) in steps.items():
            rate = statistics.median(rates[name])
            rows.append(
                {
                    "variant": name,
                    "batch": batch_size,
                    "parameters": parameters,
                    "train_images_per_s": rate,
                    "ratio_to_default": rate / baseline,
                }
            )
    report("bench_trunk", rows)
    report("bench_trunk_convolutions", convolution_rows(args.batch[0], args.steps))


if __name__ == "__main__":
    main()
