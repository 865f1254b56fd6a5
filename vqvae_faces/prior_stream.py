"""A token prior run over a batch of grids position by position: the program the codec's encoder and
decoder share, and the one owner of its cached keys and values.

Both sides must compute the same probabilities bit for bit, so both run the same XLA program
(`CausalTransformer.chunk_probabilities`, a loop over the positions of a cache chunk) on inputs of
the same shapes (`batch` grids, padded; the same cache chunks), converted to float64 the same way:
an encoder that knows every token calls it for a whole chunk (`known`), a decoder, or an encoder
choosing each token from the distribution before it, for one position at a time (`run`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from vqvae_faces.compiled import compiled
from vqvae_faces.errors import UserFacingError


class PriorStream:
    """Distributions (float64) of every position of `batch` token grids under `prior`.

    Args:
        prior: a `CausalTransformer` (a prior with a cached one-position step).
        batch: grids per call; every call has this many rows.
    """

    def __init__(self, prior, batch: int):
        if not hasattr(prior, "chunk_probabilities"):
            raise UserFacingError(
                f'the codec needs a prior with a one-position step (architecture "transformer"); '
                f"this prior is a {type(prior).__name__}."
            )
        self.prior, self.batch = prior, batch
        self.length = prior.grid_size[0] * prior.grid_size[1]
        self.chunks = prior.cache_chunks()
        self._program = compiled(prior, type(prior).chunk_probabilities, jit_compile=True)

    def _call(self, caches: list, chunk: int, previous: np.ndarray, position: int, count: int) -> np.ndarray:
        """`count` positions from `position` on, in cache chunk `chunk`, given the tokens before each
        (batch, chunk length); updates `caches[chunk]`. Returns (chunk length, batch, K) float32."""
        done = tuple(tuple(caches[index][block] for index in range(chunk)) for block in range(len(caches[chunk])))
        probabilities, caches[chunk] = self._program(
            tf.constant(previous, tf.int32),
            done,
            caches[chunk],
            tf.constant(position, tf.int32),
            tf.constant(count, tf.int32),
        )
        return probabilities.numpy()

    def _empty_caches(self) -> list:
        return [self.prior.empty_chunks(self.batch, length) for _, length in self.chunks]

    def known(self, tokens: np.ndarray) -> np.ndarray:
        """Distributions (batch, L, K) of every position of the known grids `tokens` (batch, L), a cache
        chunk per call."""
        previous = np.concatenate([-np.ones((self.batch, 1)), tokens[:, :-1]], axis=1).astype(np.int32)
        caches = self._empty_caches()
        distributions = np.empty((self.batch, self.length, self.prior.num_embeddings))
        for chunk, (start, length) in enumerate(self.chunks):
            probabilities = self._call(caches, chunk, previous[:, start : start + length], start, length)
            distributions[:, start : start + length] = probabilities.transpose(1, 0, 2)
        return distributions

    def run(self, choose: Callable[[int, np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Grids chosen position by position: at each position the distributions (batch, K) given the
        tokens chosen so far go to `choose(position, distributions)`, which returns the tokens (batch,)
        taken there. Returns the tokens (batch, L) int64 and their distributions (batch, L, K)."""
        tokens = np.zeros((self.batch, self.length), np.int64)
        distributions = np.empty((self.batch, self.length, self.prior.num_embeddings))
        caches = self._empty_caches()
        previous = -np.ones(self.batch, np.int64)
        for position in range(self.length):
            chunk = next(index for index, (start, length) in enumerate(self.chunks) if position < start + length)
            start, length = self.chunks[chunk]
            before = np.zeros((self.batch, length), np.int32)
            before[:, position - start] = previous
            probabilities = self._call(caches, chunk, before, position, 1)[position - start].astype(np.float64)
            distributions[:, position] = probabilities
            previous = tokens[:, position] = choose(position, probabilities)
        return tokens, distributions
