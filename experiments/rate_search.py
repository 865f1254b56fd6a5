"""The rate term in the token search or after it: bits and PSNR of the validation faces at each `rate_lambda`.

Two ways to spend `rate_lambda` with a searched codec: search for the lowest MSE, then let each position
take a cheaper code near the searched one (the codec's greedy pass, latent distances), or put the code
length under the prior in the search's own cost (`VQVAE.search_tokens(code_lengths=...)`). Bits are the
prior's exact code lengths (a container's size per face, without its 17-byte header).

    python experiments/rate_search.py --out OUT --data lfw-deepfunneled.tgz [--run prior] --lambdas 0 1 2
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf
from trained_runs import load_runs, parser_for

from vqvae_faces import lfw_files
from vqvae_faces.codec import FaceCodec, Fingerprints
from vqvae_faces.evaluation import decode, image_quality, load_trained_model
from vqvae_faces.prior_evaluation import log_likelihoods
from vqvae_faces.run_folder import RunPaths


def main() -> None:
    parser = parser_for(__doc__, "prior")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--faces", type=int, default=None, help="the first N validation faces only")
    parser.add_argument("--ways", nargs="+", default=["after", "inside"])
    args = parser.parse_args()
    runs = load_runs(args)
    run = runs.config.runs[args.run]
    vqvae_run = runs.config.runs[run.tokens_from]
    vqvae_paths = RunPaths.for_run(runs.out, run.tokens_from)
    validation = runs.faces.subset(lfw_files.load_split(vqvae_paths.split, runs.faces)["val"])[: args.faces]
    vqvae, _ = load_trained_model(vqvae_paths, run.tokens_from)
    prior, _ = load_trained_model(RunPaths.for_run(runs.out, args.run), args.run)
    step_size = vqvae_run.token_search_step_size
    codec = FaceCodec(vqvae, prior, Fingerprints(0, 0), args.steps, step_size)
    originals = validation.astype(np.float32) / 255.0
    print(f"{len(validation)} validation faces, {args.steps} search steps, step size {step_size}")
    print("| rate term | rate_lambda | bits/face | PSNR (dB) | faces/s |\n|---|---:|---:|---:|---:|")
    for way in args.ways:
        for rate_lambda in args.lambdas:
            began = time.perf_counter()
            if way == "after":
                grids, _ = codec.choose_tokens(validation, rate_lambda)
            else:
                search = tf.function(
                    lambda x, lam=rate_lambda: vqvae.search_tokens(x, args.steps, step_size, prior.code_lengths, lam)
                )
                grids = np.concatenate(
                    [search(tf.constant(originals[i : i + 64])).numpy() for i in range(0, len(originals), 64)]
                )
            seconds = time.perf_counter() - began
            bits = -log_likelihoods(prior, grids, 64) / np.log(2.0)
            psnr = image_quality(originals, np.clip(decode(vqvae, grids, 128), 0, 1))["psnr"].mean()
            rate = len(grids) / seconds
            print(f"| {way} the search | {rate_lambda:g} | {bits.mean():.0f} | {psnr:.2f} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
