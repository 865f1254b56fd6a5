"""Which tokens does the prior code in fewer bits: the encoder's nearest codes or the searched ones?

A VQ-VAE run's evaluation saves the test faces' searched tokens (`token_search_steps`) in
`checkpoints/<vqvae>/tokens.npz`; the prior learned the nearest codes of the training faces.
This script gives the prior's code length (bits per token and per face, 95% bootstrap
interval) of both kinds of test tokens, and the faces' PSNR from each.

    python experiments/searched_tokens_nll.py --out OUT --data lfw-deepfunneled.tgz [--run prior]
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

from vqvae_faces import lfw_files, prior_metrics  # noqa: E402
from vqvae_faces.config import load_config  # noqa: E402
from vqvae_faces.evaluation import decode, image_quality, load_trained_model, test_set, tokenize  # noqa: E402
from vqvae_faces.prior_evaluation import log_likelihoods  # noqa: E402
from vqvae_faces.run_folder import RunPaths  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", required=True, help="the LFW folder or archive the runs were trained on")
    parser.add_argument("--run", default="prior", help="the prior run")
    parser.add_argument("--config", default=str(ROOT / "experiment.json"))
    args = parser.parse_args()
    out = Path(args.out)
    config = load_config(Path(args.config), [f"data.path={args.data}"])
    vqvae_run = config.runs[args.run].tokens_from
    vqvae_paths = RunPaths.for_run(out, vqvae_run)
    faces = lfw_files.load_faces(config.data, out / "checkpoints" / "data_cache", [])
    test = test_set(vqvae_paths, faces)
    vqvae, _ = load_trained_model(vqvae_paths, vqvae_run)
    prior, _ = load_trained_model(RunPaths.for_run(out, args.run), args.run)
    saved = np.load(vqvae_paths.checkpoints / "tokens.npz")
    if list(saved["names"]) != list(test.names):
        sys.exit(f"{vqvae_paths.checkpoints / 'tokens.npz'} holds other faces than the run's test split")
    kinds = {"nearest codes": tokenize(vqvae, test.images, 128), "searched": saved["tokens"]}
    originals = test.images.astype(np.float32) / 255.0
    differing = np.mean(kinds["nearest codes"] != kinds["searched"])
    print(f"{len(originals)} test faces; tokens differing between the two: {differing:.1%}")
    print("| tokens | bits/token (95% CI) | bits/face | PSNR (dB) |\n|---|---:|---:|---:|")
    for kind, grids in kinds.items():
        summary = prior_metrics.code_length_summary(log_likelihoods(prior, grids, 64), int(np.prod(grids.shape[1:])))
        low, high = summary["bits_per_token_ci95"]
        psnr = image_quality(originals, np.clip(decode(vqvae, grids, 128), 0, 1))["psnr"].mean()
        bits = f"{summary['bits_per_token']:.3f} ({low:.3f}-{high:.3f}) | {summary['bits_per_face']:.0f}"
        print(f"| {kind} | {bits} | {psnr:.2f} |")


if __name__ == "__main__":
    main()
