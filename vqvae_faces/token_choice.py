"""Which tokens the codec sends for a batch of faces.

Three ways, from the cheapest:
  * the encoder's nearest codes (`rate_lambda` 0, no search);
  * the rate term: position by position in raster order, the code minimising its squared
    distance to the encoder's latent (in `token_search.distance_unit`s) + `rate_lambda` x
    (-log2 p(code | tokens chosen before it)), p from the prior as the decoder will compute it;
  * with `search_steps`, the tokens `token_search.search_tokens` picks by decoding, with the
    prior's code lengths in its cost when `rate_lambda` > 0; they are coded as they are.
A larger `rate_lambda` gives shorter files and blurrier faces.
"""

from __future__ import annotations

import numpy as np

from vqvae_class_keras import VQVAE
from vqvae_faces.compiled import compiled
from vqvae_faces.prior_stream import ExactStream
from vqvae_faces.token_search import distance_unit, search_tokens


def code_lengths_in_bits(probabilities: np.ndarray) -> np.ndarray:
    """-log2 of probabilities, a zero probability counted as 1e-30."""
    return -np.log2(np.maximum(probabilities, 1e-30))


class TokenChooser:
    """Tokens of a batch of faces, and the distributions the prior codes them with.

    Args:
        vqvae: the VQ-VAE whose tokens the prior learned.
        stream: the prior's `ExactStream`, whose distributions the codec codes with.
        search_steps: steps of `token_search.search_tokens`; 0: no search.
        search_step_size: the search's step size (the VQ-VAE run's `token_search_step_size`).
    """

    def __init__(self, vqvae, stream: ExactStream, search_steps: int = 0, search_step_size: float = 0.0):
        if search_steps < 0 or (search_steps > 0 and search_step_size <= 0):
            raise ValueError(
                f"search_steps must be >= 0 and search_step_size > 0 when searching, received "
                f"search_steps={search_steps}, search_step_size={search_step_size}"
            )
        self.vqvae, self.stream = vqvae, stream
        self.search_steps, self.search_step_size = search_steps, search_step_size

    def choose(self, images: np.ndarray, count: int, rate_lambda: float) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (count, L) of the first `count` float images (batch, H, W, C) in [0, 1] (the batch is padded
        to one size, so the VQ-VAE's programs are traced once), and their distributions (count, L, K)."""
        batch, length = len(images), self.stream.length
        if self.search_steps:
            search = compiled(
                self.vqvae,
                search_tokens,
                steps=self.search_steps,
                step_size=self.search_step_size,
                code_lengths=self.stream.prior.code_lengths,
                rate_lambda=rate_lambda,
            )
            return self.given(search(images).numpy().reshape(batch, length)[:count])
        if rate_lambda == 0.0:
            tokens = compiled(self.vqvae, VQVAE.encode_to_tokens)(images).numpy().reshape(batch, length)
            return self.given(tokens[:count])
        distances = self.vqvae.quantizer.squared_distances(self.vqvae.encoder(images))
        unit = distance_unit(distances).numpy().astype(np.float64)
        costs = (distances.numpy().astype(np.float64) / unit).reshape(batch, length, -1)[:count]
        return self.stream.run(
            lambda position, probabilities: np.argmin(
                costs[:, position] + rate_lambda * code_lengths_in_bits(probabilities), axis=-1
            ),
            count,
        )

    def given(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Known tokens (count, L) and their distributions (count, L, K)."""
        return tokens, self.stream.known(tokens)
