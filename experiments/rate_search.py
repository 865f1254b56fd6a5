"""Bits and PSNR of the validation faces at each `rate_lambda`, as the codec chooses their tokens.

With `--steps` > 0 the codec searches the tokens (`VQVAE.search_tokens`) with the prior's code lengths
in the search's cost; with `--steps 0` it takes the nearest codes with the rate term position by
position. Run at commit e269700 (the same command, this file copied there) it measures the codec
before the rate term moved into the search: search for the lowest error first, then let each
position take a cheaper code near the searched one. Bits are the prior's code lengths of the chosen
tokens (a container's size per face without its 17-byte header).

    python experiments/rate_search.py --out OUT --data lfw-deepfunneled.tgz [--run prior] --lambdas 0 1 2
"""

from __future__ import annotations

import time

import numpy as np
from trained_runs import load_runs, parser_for

from vqvae_faces import lfw_files
from vqvae_faces.codec import FaceCodec
from vqvae_faces.evaluation import image_quality
from vqvae_faces.inference import decode, load_trained_model
from vqvae_faces.run_folder import RunPaths
from vqvae_faces.vqf_format import Fingerprints


def main() -> None:
    parser = parser_for(__doc__, "prior")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    parser.add_argument("--steps", type=int, default=50, help="token search steps (0: nearest codes)")
    parser.add_argument("--faces", type=int, default=None, help="the first N validation faces only")
    args = parser.parse_args()
    runs = load_runs(args)
    run = runs.config.runs[args.run]
    vqvae_paths = RunPaths.for_run(runs.out, run.tokens_from)
    validation = runs.faces.subset(lfw_files.load_split(vqvae_paths.split, runs.faces)["val"])[: args.faces]
    vqvae, _ = load_trained_model(vqvae_paths, run.tokens_from)
    prior, _ = load_trained_model(RunPaths.for_run(runs.out, args.run), args.run)
    step_size = runs.config.runs[run.tokens_from].token_search_step_size
    codec = FaceCodec(vqvae, prior, Fingerprints(0, 0), args.steps, step_size if args.steps else 0.0)
    originals = validation.astype(np.float32) / 255.0
    print(f"{len(validation)} validation faces of {args.run}, {args.steps} search steps, step size {step_size}")
    print("| rate_lambda | bits/face | PSNR (dB) | faces/s |\n|---:|---:|---:|---:|")
    for rate_lambda in args.lambdas:
        began = time.perf_counter()
        grids, bits = codec.choose_tokens(validation, rate_lambda)
        rate = len(grids) / (time.perf_counter() - began)
        psnr = image_quality(originals, np.clip(decode(vqvae, grids, 128), 0, 1))["psnr"].mean()
        print(f"| {rate_lambda:g} | {bits.mean():.0f} | {psnr:.2f} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
