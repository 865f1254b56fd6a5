"""Choosing a VQ-VAE's tokens by decoding them (analysis by synthesis), and the rate term both the
search and the codec weigh distances against.

The encoder's nearest codes are a local guess; the decoder may rebuild a face better from other
codes. `search_tokens` starts from the encoder's latents z and, for `steps` steps, quantizes z,
decodes, and moves z against the gradient of each image's reconstruction error taken at its codes
(straight-through). Each image keeps the tokens of its lowest cost so far, so the result is never
worse than the nearest codes by that cost.

Shapes: B = batch, H x W x C = image, h x w = token grid, K = codes.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from keras import ops


def distance_unit(distances):
    """The unit the rate term measures squared distances in: each image's mean squared distance from
    its latents to their nearest codes, (B, 1, 1, 1) for `distances` (B, h, w, K), so that a rate
    weight means the same for every face."""
    return ops.mean(ops.min(distances, axis=-1), axis=(1, 2))[:, None, None, None] + 1e-12


def grid_bits(lengths, tokens):
    """The code length in bits of each grid (B,): `lengths` (B, h, w, K) at the `tokens` (B, h, w)."""
    return ops.sum(ops.take_along_axis(lengths, tokens[..., None], axis=-1), axis=(1, 2, 3))


class _Distortion:
    """The search's cost without a rate: each image's reconstruction MSE; tokens are the nearest codes.

    `quantize(latents, lengths)` returns (tokens (B, h, w), costs (B,), the gradient of the
    summed MSE at the tokens' codes (B, h, w, D), and the code lengths the next step uses).
    """

    def __init__(self, vqvae, images):
        self.vqvae, self.images = vqvae, images

    def error_and_gradient(self, tokens):
        codes = self.vqvae.quantizer.lookup(tokens)
        with tf.GradientTape() as tape:
            tape.watch(codes)
            decoded = ops.cast(self.vqvae.decoder(codes), "float32")
            errors = ops.mean(ops.square(decoded - self.images), axis=(1, 2, 3))
            total = ops.sum(errors)
        return errors, tape.gradient(total, codes)

    def start(self, tokens):
        """The costs to beat (B,) and the first step's code lengths, for the nearest codes `tokens`."""
        return ops.full((ops.shape(self.images)[0],), float("inf")), ops.zeros((1, 1, 1, 1))

    def quantize(self, latents, lengths):
        tokens = self.vqvae.quantizer.encode_indices(latents)
        errors, gradient = self.error_and_gradient(tokens)
        return tokens, errors, gradient, lengths


class _DistortionAndRate(_Distortion):
    """The search's cost with a rate: distortion + `rate_lambda` x the grid's code length in bits.

    The distortion is the MSE in units of the nearest codes' MSE / (h * w), so that a position's
    share of the nearest codes' distortion is 1. A step quantizes each latent to the code
    minimising its squared distance in `distance_unit`s of the encoder's latents + `rate_lambda` x its
    code length given the previous step's tokens.
    """

    def __init__(self, vqvae, images, latents, code_lengths, rate_lambda):
        super().__init__(vqvae, images)
        self.code_lengths, self.rate_lambda = code_lengths, rate_lambda
        self.unit = distance_unit(vqvae.quantizer.squared_distances(latents))

    def start(self, tokens):
        self.start_errors, _ = self.error_and_gradient(tokens)
        self.positions = float(np.prod(tokens.shape[1:]))
        lengths = self.code_lengths(tokens)
        return self.positions + self.rate_lambda * grid_bits(lengths, tokens), lengths

    def quantize(self, latents, lengths):
        scores = self.vqvae.quantizer.squared_distances(latents) / self.unit + self.rate_lambda * lengths
        tokens = ops.cast(ops.argmin(scores, axis=-1), "int32")
        errors, gradient = self.error_and_gradient(tokens)
        lengths = self.code_lengths(tokens)
        costs = self.positions * errors / (self.start_errors + 1e-12) + self.rate_lambda * grid_bits(lengths, tokens)
        return tokens, costs, gradient, lengths


def search_tokens(vqvae, images, steps, step_size, code_lengths=None, rate_lambda=0.0):
    """(B, H, W, C) images -> (B, h, w) int32 tokens of `vqvae` chosen by decoding them.

    Each step's move is normalised per image to an RMS of `step_size` x the codebook's RMS x
    (1 - step / steps): the step shrinks linearly to zero, so the search ranges widely first and
    refines near its end. The cost is the reconstruction MSE, or with `code_lengths` and
    `rate_lambda` > 0, distortion + `rate_lambda` x (code length of the grid in bits), see
    `_DistortionAndRate`.

    Args:
        vqvae: a `VQVAE`.
        images: (B, H, W, C) in [0, 1].
        steps: decoder steps; 0 returns the nearest codes.
        step_size: the first step's RMS in units of the codebook's RMS.
        code_lengths: None, or a function of tokens (B, h, w) int32 returning the code length in
            bits of every token at every position given the tokens before it, (B, h, w, K) float32
            (`TokenPrior.code_lengths`).
        rate_lambda: bits' weight in the cost; 0 ignores `code_lengths`.

    Returns:
        (B, h, w) int32 tokens.
    """
    if rate_lambda < 0:
        raise ValueError(f"rate_lambda must be >= 0, received rate_lambda={rate_lambda}")
    images = ops.cast(images, "float32")
    latents = ops.cast(vqvae.encoder(images), "float32")
    if code_lengths is not None and rate_lambda > 0:
        cost = _DistortionAndRate(vqvae, images, latents, code_lengths, rate_lambda)
    else:
        cost = _Distortion(vqvae, images)
    step = step_size * ops.sqrt(ops.mean(ops.square(vqvae.quantizer.embeddings)))
    start = vqvae.quantizer.encode_indices(latents)
    start_costs, start_lengths = cost.start(start)

    def body(index, latents, lengths, best_tokens, best_costs):
        tokens, costs, gradient, lengths = cost.quantize(latents, lengths)
        better = costs < best_costs
        best_tokens = ops.where(better[:, None, None], tokens, best_tokens)
        best_costs = ops.where(better, costs, best_costs)
        scale = ops.sqrt(ops.mean(ops.square(gradient), axis=(1, 2, 3), keepdims=True)) + 1e-12
        remaining = 1.0 - ops.cast(index, "float32") / ops.cast(steps, "float32")
        return index + 1, latents - step * remaining * gradient / scale, lengths, best_tokens, best_costs

    _, _, _, tokens, _ = tf.while_loop(
        lambda index, *_: index < steps, body, (tf.constant(0), latents, start_lengths, start, start_costs)
    )
    return tokens
