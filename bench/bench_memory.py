"""Peak resident memory of a training run and how it grows with the dataset size.

Each size runs in a fresh process (one short epoch of the default VQ-VAE on synthetic
64x64 faces, with augmentation), which reports `resource.getrusage` peak RSS. The
pipeline keeps only the uint8 dataset in memory and augments batches on the fly, so
memory should grow by about N x 12 KiB, not by augmented copies.

    python bench/bench_memory.py [--sizes 1000 4000 16000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from common import report, sample_images

STEPS = 20


def child(count: int) -> None:
    from vqvae_faces import pipeline
    from vqvae_faces.config import AugmentationConfig, VQVAEConfig
    from vqvae_faces.model_settings import build_model

    images = sample_images(count, 64)
    model = build_model(VQVAEConfig(), 3, None, seed=0)
    model.build((None, 64, 64, 3))
    augmenter = pipeline.FaceAugmenter(AugmentationConfig(), 64, 3)
    dataset = pipeline.make_training_dataset(images, 64, 0, 0, STEPS, augmenter)
    model.fit(dataset, epochs=1, steps_per_epoch=STEPS, verbose=0)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"images": count, "dataset_mib": images.nbytes / 2**20, "peak_rss_mib": peak_kib / 1024}))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    rows = []
    for count in args.sizes:
        output = subprocess.run(
            [sys.executable, __file__, "--child", str(count)], capture_output=True, text=True, check=True
        ).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    base = rows[0]
    for row in rows:
        row["growth_mib"] = row["peak_rss_mib"] - base["peak_rss_mib"]
        row["dataset_growth_mib"] = row["dataset_mib"] - base["dataset_mib"]
    report("bench_memory", rows, {"steps": STEPS})


if __name__ == "__main__":
    main()
