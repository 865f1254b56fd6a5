"""The tf.data side of the faces: scaling to [0, 1], per-epoch shuffles and on-the-fly augmentation.

Images arrive as the uint8 arrays `lfw_files` decodes; every random choice here is a
pure function of (seed, epoch, batch), so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from vqvae_faces.config import AugmentationConfig

# Augmentation runs in the input pipeline on float32 images, whatever the model's mixed-precision policy.
FLOAT32 = "float32"


def _stateless_seeds(seed):
    """A `keras.random.SeedGenerator` whose draws are derived from one seed tensor (2,).

    Keras image layers take their randomness only from an int or a SeedGenerator;
    this stand-in lets them take a per-batch tensor seed instead, so a batch's
    augmentation is a pure function of that seed (no variable state to replay
    after a restart). It deliberately skips `SeedGenerator.__init__`, which would
    create a state variable inside the tf.data function.
    """

    class StatelessSeeds(keras.random.SeedGenerator):
        def __init__(self):
            self.draws = 0

        def next(self, ordered=True):
            self.draws += 1
            return tf.random.experimental.stateless_fold_in(seed, self.draws)

    return StatelessSeeds()


class FaceAugmenter:
    """The ten attribute-preserving augmentations, each applied per image with a probability.

    Call on a float32 batch (B, H, W, C) in [0, 1] with a seed tensor (2,) int64;
    returns the same shape in [0, 1]. The result depends only on the images and
    the seed: training passes a seed made from (run seed, epoch, batch), so each
    epoch sees new variants and a resumed run sees the same ones as an
    uninterrupted run.
    """

    def __init__(self, settings: AugmentationConfig, image_size: int, channels: int):
        layers = keras.layers
        unit = (0.0, 1.0)
        self.probability = settings.probability
        self.noise_stddev = settings.noise_stddev
        self.layers = []
        if settings.flip:
            self.layers.append(layers.RandomFlip("horizontal", dtype=FLOAT32))
        if settings.brightness:
            self.layers.append(layers.RandomBrightness(settings.brightness, value_range=unit, dtype=FLOAT32))
        if settings.contrast:
            self.layers.append(layers.RandomContrast(settings.contrast, value_range=unit, dtype=FLOAT32))
        if settings.sharpness:
            half = settings.sharpness / 2
            self.layers.append(layers.RandomSharpness((0.5 - half, 0.5 + half), value_range=unit, dtype=FLOAT32))
        if settings.saturation and channels == 3:
            low, high = 1.0 - settings.saturation, 1.0 + settings.saturation
            self.layers.append(
                layers.RandomSaturation((low / (1 + low), high / (1 + high)), value_range=unit, dtype=FLOAT32)
            )
        if settings.rotation_degrees:
            self.layers.append(
                layers.RandomRotation(settings.rotation_degrees / 360.0, fill_mode="reflect", dtype=FLOAT32)
            )
        if settings.translation_pixels:
            shift = settings.translation_pixels / image_size
            self.layers.append(layers.RandomTranslation(shift, shift, fill_mode="reflect", dtype=FLOAT32))
        if settings.blur_sigma:
            self.layers.append(
                layers.RandomGaussianBlur(
                    factor=(1.0, 1.0),
                    kernel_size=3,
                    sigma=(0.1, settings.blur_sigma),
                    value_range=unit,
                    dtype=FLOAT32,
                )
            )
        if settings.zoom:
            self.layers.append(layers.RandomZoom((-settings.zoom, 0.0), fill_mode="reflect", dtype=FLOAT32))

    @property
    def names(self) -> list[str]:
        """The enabled operations, in the order they are applied."""
        return [layer.name for layer in self.layers] + (["gaussian_noise"] if self.noise_stddev else [])

    def _transforms(self):
        """(seed -> images -> images) functions, one per enabled operation."""

        def keras_layer(layer):
            def apply(images, seed):
                transformation = layer.get_random_transformation(images, training=True, seed=_stateless_seeds(seed))
                return layer.transform_images(images, transformation, training=True)

            return apply

        def noise(images, seed):
            return images + self.noise_stddev * tf.random.stateless_normal(tf.shape(images), seed=seed)

        return [keras_layer(layer) for layer in self.layers] + ([noise] if self.noise_stddev else [])

    def __call__(self, images, seed):
        seed = tf.cast(seed, tf.int64)
        batch = tf.shape(images)[0]
        for number, transform in enumerate(self._transforms()):
            op_seed = tf.random.experimental.stateless_fold_in(seed, number)
            changed = transform(images, tf.random.experimental.stateless_fold_in(op_seed, 0))
            chosen = tf.random.stateless_uniform([batch], seed=tf.random.experimental.stateless_fold_in(op_seed, 1))
            images = tf.where(chosen[:, None, None, None] < self.probability, tf.cast(changed, images.dtype), images)
        return tf.clip_by_value(images, 0.0, 1.0)


def steps_per_epoch(count: int, batch_size: int, drop_remainder: bool) -> int:
    """Batches in one pass over `count` images."""
    return count // batch_size if drop_remainder else -(-count // batch_size)


def _distribute_by_data(dataset):
    """Shard by elements (batches) across workers, then prefetch."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def _scaled(pool, index):
    """uint8 images `pool[index]` as float32 in [0, 1]."""
    return tf.cast(tf.gather(pool, index), tf.float32) / 255.0


def make_dataset(images: np.ndarray, batch_size: int, drop_remainder: bool = False):
    """Untouched images in file order, batched and scaled to [0, 1] (validation, test, evaluation).

    `drop_remainder` drops a last partial batch (needed with several workers,
    whose collectives require equal shapes).
    """
    pool = tf.convert_to_tensor(images, dtype=tf.uint8)
    dataset = tf.data.Dataset.range(len(images)).batch(batch_size, drop_remainder=drop_remainder)
    return _distribute_by_data(dataset.map(lambda index: _scaled(pool, index), num_parallel_calls=tf.data.AUTOTUNE))


def _epoch_batches(count: int, batch_size: int, seed: int, first_epoch: int, epochs: int, drop_remainder: bool):
    """(batch seed, indices) for each batch of epochs `first_epoch` .. `epochs - 1`.

    Each epoch is a fresh permutation of range(count); the permutation and each
    batch's seed are pure functions of (`seed`, epoch, batch).
    """
    positions = tf.range(count, dtype=tf.int64)
    base = tf.constant([seed, 0], tf.int64)

    def one_epoch(epoch):
        epoch_seed = tf.random.experimental.stateless_fold_in(base, epoch)
        order = tf.random.experimental.stateless_shuffle(positions, seed=epoch_seed)
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder=drop_remainder)
        return batches.enumerate().map(
            lambda step, index: (tf.random.experimental.stateless_fold_in(epoch_seed, step + 1), index)
        )

    return tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)


def make_training_dataset(
    images: np.ndarray,
    batch_size: int,
    seed: int,
    first_epoch: int,
    epochs: int,
    augmenter: Optional[FaceAugmenter] = None,
    drop_remainder: bool = False,
    tokenize: Optional[Callable] = None,
):
    """Training batches for epochs `first_epoch` .. `epochs - 1`, one after the other: float32 images
    (B, H, W, C) in [0, 1], or with `tokenize` (a VQ-VAE's images -> tokens) their int32 token grids
    (B, h, w), the data of a prior that learns the tokens of fresh variants of its faces every epoch.

    Each epoch is a fresh permutation of the images, and each batch is augmented
    with its own seed; both are pure functions of (`seed`, epoch, batch), so a
    run resumed at `first_epoch` sees exactly the batches an uninterrupted run
    would. Pass `steps_per_epoch(len(images), batch_size, drop_remainder)` to
    `fit`. The images are held once, as a uint8 tensor; only indices are
    shuffled and each batch is gathered, so memory does not grow with
    augmentation.
    """
    pool = tf.convert_to_tensor(images, dtype=tf.uint8)

    def load(batch_seed, index):
        batch = _scaled(pool, index)
        if augmenter is not None:
            batch = augmenter(batch, batch_seed)
        return batch if tokenize is None else tf.cast(tokenize(batch), tf.int32)

    batches = _epoch_batches(len(images), batch_size, seed, first_epoch, epochs, drop_remainder)
    return _distribute_by_data(batches.map(load, num_parallel_calls=tf.data.AUTOTUNE))


def make_token_dataset(grids: np.ndarray, batch_size: int, drop_remainder: bool = False):
    """int32 token grids (B, h, w) in file order, batched (a prior's validation and evaluation)."""
    dataset = tf.data.Dataset.from_tensor_slices(grids.astype(np.int32)).batch(
        batch_size, drop_remainder=drop_remainder
    )
    return _distribute_by_data(dataset)


def make_token_training_dataset(
    grids: np.ndarray, batch_size: int, seed: int, first_epoch: int, epochs: int, drop_remainder: bool = False
):
    """A prior's training batches of int32 token grids (B, h, w), shuffled per epoch like
    `make_training_dataset`, so a resumed prior run sees the batches an uninterrupted one would."""
    pool = tf.convert_to_tensor(grids.astype(np.int32))
    batches = _epoch_batches(len(grids), batch_size, seed, first_epoch, epochs, drop_remainder)
    return _distribute_by_data(batches.map(lambda _, index: tf.gather(pool, index)))
