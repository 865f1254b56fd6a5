"""Training throughput of the default model (images/s, steady state: compile and the first
steps excluded), float32 vs mixed precision, at 64x64 and several batch sizes; plus
evaluation throughput (encode to tokens: nearest codes, and searched by decoding; decode from tokens).

    python bench/bench_training.py [--batch 64 128] [--steps 10]
"""

from __future__ import annotations

import argparse

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import report, sample_images, timed

from vqvae_faces.config import VQVAEConfig  # noqa: E402
from vqvae_faces.model_settings import build_model  # noqa: E402
from vqvae_faces.token_search import search_tokens  # noqa: E402


def train_rate(policy: str, images, batch_size: int, steps: int, jit: bool = False) -> tuple[float, float]:
    """(images/s, final loss) for `steps` train steps of the default VQ-VAE under `policy` (XLA if `jit`)."""
    keras.mixed_precision.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    try:
        model = build_model(VQVAEConfig(), images.shape[-1], None, seed=0)
        model.build((None,) + images.shape[1:])
        batch = tf.constant(images[:batch_size].astype("float32") / 255.0)
        step = tf.function(model.train_step, jit_compile=jit)
        for _ in range(3):
            step(batch)
        losses = []

        def run():
            for _ in range(steps):
                logs = step(batch)
            losses.append(float(logs["reconstruction_loss"]))

        seconds = timed(run, repeats=2)
        return steps * batch_size / seconds, losses[-1]
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def eval_rates(images, batch_size: int) -> dict:
    run = VQVAEConfig()
    model = build_model(run, images.shape[-1], None, seed=0)
    model.build((None,) + images.shape[1:])
    batch = tf.constant(images[:batch_size].astype("float32") / 255.0)
    batch_size = int(batch.shape[0])  # fewer when fewer images were sampled
    encode = tf.function(model.encode_to_tokens)
    search = tf.function(lambda x: search_tokens(model, x, run.token_search_steps, run.token_search_step_size))
    decode = tf.function(model.decode_tokens)
    tokens = encode(batch)
    rates = {
        "encode_to_tokens_images_per_s": 10 * batch_size / timed(lambda: [encode(batch).numpy() for _ in range(10)]),
        "search_tokens_images_per_s": batch_size / timed(lambda: search(batch).numpy()),
        "decode_tokens_images_per_s": 10 * batch_size / timed(lambda: [decode(tokens).numpy() for _ in range(10)]),
    }
    rates["search_steps"] = run.token_search_steps
    rates["search_to_encode_ratio"] = rates["search_tokens_images_per_s"] / rates["encode_to_tokens_images_per_s"]
    return rates


def _row(batch_size, policy, xla, rate, baseline, loss) -> dict:
    return {
        "batch": batch_size,
        "policy": policy,
        "xla": xla,
        "train_images_per_s": rate,
        "ratio_to_float32": rate / baseline,
        "loss_after_steps": loss,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--policies", nargs="+", default=["float32", "mixed_bfloat16"])
    args = parser.parse_args()
    images = sample_images(max(args.batch), 64)
    rows = []
    for batch_size in args.batch:
        baseline = None
        for policy in args.policies:
            rate, loss = train_rate(policy, images, batch_size, args.steps)
            baseline = baseline or rate
            rows.append(_row(batch_size, policy, False, rate, baseline, loss))
        rate, loss = train_rate("float32", images, batch_size, args.steps, jit=True)
        rows.append(_row(batch_size, "float32", True, rate, baseline, loss))
    extra = eval_rates(images, 128)
    print(", ".join(f"{k}: {v:.3g}" for k, v in extra.items()))
    report("bench_training", rows, extra)


if __name__ == "__main__":
    main()
