"""Input pipeline throughput (images/s): batch + scale, with and without augmentation,
each augmentation alone, and the default model's training step for comparison.

    python bench/bench_pipeline.py [--data ../shared/data/lfw-deepfunneled-dev.tgz] [--images 4096]
"""

from __future__ import annotations

import argparse
import dataclasses

from common import report, sample_images, timed

from vqvae_faces import pipeline  # noqa: E402
from vqvae_faces.config import AugmentationConfig, VQVAEConfig  # noqa: E402

OPS = [
    "flip",
    "brightness",
    "contrast",
    "sharpness",
    "saturation",
    "rotation_degrees",
    "noise_stddev",
    "translation_pixels",
    "blur_sigma",
    "zoom",
]


def pipeline_rate(images, batch_size, augmenter) -> float:
    dataset = pipeline.make_training_dataset(images, batch_size, 0, 0, 1, augmenter)

    def drain():
        for _ in dataset:
            pass

    return len(images) / timed(drain, repeats=2)


def training_rate(images, batch_size, steps=8) -> float:
    import keras
    import tensorflow as tf

    from vqvae_faces.model_settings import build_model

    model = build_model(VQVAEConfig(), images.shape[-1], None, seed=0)
    model.build((None,) + images.shape[1:])
    batch = tf.constant(images[:batch_size].astype("float32") / 255.0)
    step = tf.function(model.train_step)

    def run():
        for _ in range(steps):
            logs = step(batch)
        keras.ops.convert_to_numpy(logs["loss"])

    return steps * batch_size / timed(run, repeats=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=None)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    images = sample_images(args.images, 64, args.data)
    channels = images.shape[-1]
    rows = [
        {"pipeline": "batch + scale (no augmentation)", "images_per_s": pipeline_rate(images, args.batch_size, None)}
    ]
    default = pipeline.FaceAugmenter(AugmentationConfig(), 64, channels)
    rows.append(
        {
            "pipeline": "all ten augmentations (p=0.25 each)",
            "images_per_s": pipeline_rate(images, args.batch_size, default),
        }
    )
    off = {op: (False if op == "flip" else 0.0) for op in OPS}
    for op in OPS:
        settings = dataclasses.replace(AugmentationConfig(**off), **{op: getattr(AugmentationConfig(), op)})
        augmenter = pipeline.FaceAugmenter(settings, 64, channels)
        if augmenter.names:
            rows.append({"pipeline": f"only {op}", "images_per_s": pipeline_rate(images, args.batch_size, augmenter)})
    train = training_rate(images, args.batch_size)
    rows.append({"pipeline": "training step of the default model (reference)", "images_per_s": train})
    for row in rows:
        row["ratio_to_training"] = row["images_per_s"] / train
    report("bench_pipeline", rows, {"data": args.data or "synthetic", "batch_size": args.batch_size})


if __name__ == "__main__":
    main()
