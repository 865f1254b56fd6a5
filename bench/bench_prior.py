"""Speed of the token priors: sampling faces/s for a batch of token grids, cached vs full-pass,
and the `.vqf` codec's encoding and decoding faces/s.

The transformer's cached path runs one compiled step per token; the full-pass path (the only
one the PixelCNN has) runs the whole network once per token. The codec rows encode 64x64 faces
(nearest codes + range coding, rate_lambda 0) and decode the files again, one CODEC_BATCH group
after a warm-up group. The step rows time the prior's distributions for CODEC_BATCH grids, in
milliseconds per position (mean over the grid), one position at a time, as decoding does
(`PriorStream.run`), and for known grids, as encoding does (`PriorStream.known`): in the codec's
integer arithmetic (`ExactStream`) and in format 1's float32 XLA program (`FloatStream`).
Sizes are those of the default VQ-VAE and prior: a 16x16 grid of 512 codes. Untrained weights:
speed does not depend on them.

    python bench/bench_prior.py [--batch 64] [--passes 4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np  # noqa: E402 (after common, which sets the TensorFlow environment)
import tensorflow as tf  # noqa: E402
from common import report, sample_images

from vqvae_class_keras import VQVAE  # noqa: E402
from vqvae_faces.codec import CODEC_BATCH, FaceCodec  # noqa: E402
from vqvae_faces.prior_stream import ExactStream, FloatStream  # noqa: E402
from vqvae_faces.token_prior import CausalTransformer, GatedPixelCNN  # noqa: E402
from vqvae_faces.vqf_format import Fingerprints  # noqa: E402

GRID, K = (16, 16), 512


def full_pass_faces_per_second(model, batch: int, passes: int) -> float:
    """A full-pass sampler runs the model once per token: faces/s = batch / (tokens x one pass)."""
    tokens = np.zeros((batch, *GRID), np.int32)
    forward = tf.function(model.call)
    forward(tokens)
    started = time.perf_counter()
    for _ in range(passes):
        forward(tokens)
    per_pass = (time.perf_counter() - started) / passes
    return batch / (GRID[0] * GRID[1] * per_pass)


def codec_faces_per_second(prior) -> tuple[float, float]:
    """Encoding and decoding faces/s of a FaceCodec with the default VQ-VAE and `prior`."""
    vqvae = VQVAE(image_channels=3)
    vqvae.build((None, 64, 64, 3))
    codec = FaceCodec(vqvae, prior, Fingerprints(0, 0))
    faces = sample_images(CODEC_BATCH)
    files = codec.encode(faces, container=False).files  # warm-up: compiles the step for every cache chunk
    codec.decode(files, [str(index) for index in range(len(files))])
    started = time.perf_counter()
    encoded = codec.encode(faces, container=False)
    files, grids = encoded.files, encoded.grids
    encoding = len(faces) / (time.perf_counter() - started)
    started = time.perf_counter()
    decoded = codec.decode(files, [str(index) for index in range(len(files))])
    decoding = len(faces) / (time.perf_counter() - started)
    assert np.array_equal(decoded, grids), "the codec did not decode the tokens it encoded"
    return encoding, decoding


def step_milliseconds(prior) -> dict[str, float]:
    """Milliseconds per position of the prior's distributions on the codec's path (see the docstring)."""
    zeros = np.zeros((CODEC_BATCH, GRID[0] * GRID[1]), np.int64)
    times = {}
    for arithmetic, stream in (("integer", ExactStream(prior)), ("float32 XLA", FloatStream(prior, CODEC_BATCH))):
        variants = {
            "a position at a time (decoding)": lambda: stream.run(
                lambda position, probabilities: zeros[:, position], CODEC_BATCH
            ),
            "known grids (encoding)": lambda: stream.known(zeros),
        }
        for name, run in variants.items():
            run()  # compiles
            started = time.perf_counter()
            run()
            times[f"{arithmetic}, {name}"] = 1000 * (time.perf_counter() - started) / (GRID[0] * GRID[1])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--passes", type=int, default=4)
    args = parser.parse_args()
    transformer = CausalTransformer(K, GRID, width=128, num_heads=4, num_layers=4)
    pixelcnn = GatedPixelCNN(K, GRID, channels=128, num_layers=8)
    for model in (transformer, pixelcnn):
        model(np.zeros((1, *GRID), np.int32))
    transformer.sample_tokens(args.batch, tf.constant([0, 0], tf.int64))  # traces the step
    started = time.perf_counter()
    transformer.sample_tokens(args.batch, tf.constant([0, 1], tf.int64))
    cached = args.batch / (time.perf_counter() - started)
    baseline = full_pass_faces_per_second(transformer, args.batch, args.passes)
    rows = [
        {"sampler": "transformer, cached keys/values", "faces_per_second": cached, "ratio": cached / baseline},
        {"sampler": "transformer, full pass per token", "faces_per_second": baseline, "ratio": 1.0},
    ]
    pixel = full_pass_faces_per_second(pixelcnn, args.batch, args.passes)
    rows.append(
        {"sampler": "gated PixelCNN, full pass per token", "faces_per_second": pixel, "ratio": pixel / baseline}
    )
    encoding, decoding = codec_faces_per_second(transformer)
    rows.append({"sampler": ".vqf codec: encode (nearest codes + range coding)", "faces_per_second": encoding})
    rows.append({"sampler": ".vqf codec: decode", "faces_per_second": decoding})
    for name, milliseconds in step_milliseconds(transformer).items():
        rows.append({"sampler": f".vqf codec step: {name}", "ms_per_position": milliseconds})
    report("bench_prior", rows, vars(args))


if __name__ == "__main__":
    main()
