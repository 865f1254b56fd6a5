"""Which tokens does the prior code in fewer bits: the encoder's nearest codes or the searched ones?

A VQ-VAE run's evaluation saves the test faces' searched tokens (`token_search_steps`) in
`checkpoints/<vqvae>/tokens.npz`; the prior learned the nearest codes of the training faces.
This script gives the prior's code length (bits per token and per face, 95% bootstrap
interval) of both kinds of test tokens, and the faces' PSNR from each.

    python experiments/searched_tokens_nll.py --out OUT --data lfw-deepfunneled.tgz [--run prior]
"""

from __future__ import annotations

import sys

import numpy as np
from trained_runs import load_runs, parser_for

from vqvae_faces import prior_metrics
from vqvae_faces.evaluation import image_quality, test_set
from vqvae_faces.inference import decode, load_trained_model, tokenize
from vqvae_faces.prior_evaluation import log_likelihoods
from vqvae_faces.run_folder import RunPaths


def main() -> None:
    args = parser_for(__doc__, "prior").parse_args()
    runs = load_runs(args)
    vqvae_run = runs.config.runs[args.run].tokens_from
    vqvae_paths = RunPaths.for_run(runs.out, vqvae_run)
    test = test_set(vqvae_paths, runs.faces)
    vqvae, _ = load_trained_model(vqvae_paths, vqvae_run)
    prior, _ = load_trained_model(RunPaths.for_run(runs.out, args.run), args.run)
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
