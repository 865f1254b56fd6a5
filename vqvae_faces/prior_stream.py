"""A token prior run over a batch of grids position by position: what the codec's encoder and decoder
share, and the one owner of the prior's cached keys and values on the codec's path.

Both sides must compute the same probabilities bit for bit. `ExactStream` (`.vqf` formats 2 and 3) computes
them in integer arithmetic (`integer_prior.py`), the same on every computer. `FloatStream` decodes
files of format 1, whose probabilities came from the float32 XLA program
(`CausalTransformer.chunk_probabilities`) on inputs of one shape (`batch` grids, padded): the same
bits only where the arithmetic is the same (the writer's instruction set and TensorFlow).

An encoder that knows every token gets every distribution at once (`known`); a decoder, or an
encoder choosing each token from the distribution before it, goes one position at a time (`run`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from vqvae_faces.compiled import compiled
from vqvae_faces.errors import UserFacingError
from vqvae_faces.integer_prior import IntegerPrior


class PriorStream:
    """Distributions (float64) of every position of token grids under `prior` (a `CausalTransformer`:
    a prior with a cached one-position step)."""

    def __init__(self, prior):
        if not hasattr(prior, "step_logits"):
            raise UserFacingError(
                f'the codec needs a prior with a one-position step (architecture "transformer"); '
                f"this prior is a {type(prior).__name__}."
            )
        self.prior = prior
        self.length = prior.grid_size[0] * prior.grid_size[1]
        self.num_embeddings = prior.num_embeddings

    def known(self, tokens: np.ndarray) -> np.ndarray:
        """Distributions (B, L, K) of every position of the known grids `tokens` (B, L)."""
        raise NotImplementedError

    def _start(self, count: int):
        """The state (cached keys and values) of `count` grids before their first position."""
        raise NotImplementedError

    def _step(self, state, previous: np.ndarray, position: int) -> np.ndarray:
        """Distributions (count, K) at `position` given the tokens before it (count,), -1 at 0."""
        raise NotImplementedError

    def run(self, choose: Callable[[int, np.ndarray], np.ndarray], count: int) -> tuple[np.ndarray, np.ndarray]:
        """`count` grids chosen position by position: at each position the distributions (count, K) given
        the tokens chosen so far go to `choose(position, distributions)`, which returns the tokens (count,)
        taken there. Returns the tokens (count, L) int64 and their distributions (count, L, K)."""
        tokens = np.zeros((count, self.length), np.int64)
        distributions = np.empty((count, self.length, self.num_embeddings))
        state = self._start(count)
        previous = -np.ones(count, np.int64)
        for position in range(self.length):
            distributions[:, position] = probabilities = self._step(state, previous, position)
            previous = tokens[:, position] = choose(position, probabilities)
        return tokens, distributions


class ExactStream(PriorStream):
    """The prior in integer arithmetic (`IntegerPrior`): any number of grids per call, the same
    distributions whichever computer, batch or call pattern computes them."""

    def __init__(self, prior):
        super().__init__(prior)
        self.integer_prior = IntegerPrior(prior)

    def known(self, tokens: np.ndarray) -> np.ndarray:
        return IntegerPrior.distributions(self.integer_prior.logits(tokens))

    def _start(self, count: int):
        return self.integer_prior.new_cache(count)

    def _step(self, state, previous: np.ndarray, position: int) -> np.ndarray:
        return IntegerPrior.distributions(self.integer_prior.step(state, previous, position))


class FloatStream(PriorStream):
    """The prior's float32 XLA program, as `.vqf` format 1 computed it: `batch` grids per call (callers pad),
    a cache chunk per call for known grids, a position per call otherwise."""

    def __init__(self, prior, batch: int):
        super().__init__(prior)
        self.batch = batch
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

    def _start(self, count: int):
        if count != self.batch:
            raise ValueError(f"a FloatStream computes {self.batch} grids per call, received count={count}")
        return [self.prior.empty_chunks(self.batch, length) for _, length in self.chunks]

    def known(self, tokens: np.ndarray) -> np.ndarray:
        previous = np.concatenate([-np.ones((self.batch, 1)), tokens[:, :-1]], axis=1).astype(np.int32)
        caches = self._start(len(tokens))
        distributions = np.empty((self.batch, self.length, self.num_embeddings))
        for chunk, (start, length) in enumerate(self.chunks):
            probabilities = self._call(caches, chunk, previous[:, start : start + length], start, length)
            distributions[:, start : start + length] = probabilities.transpose(1, 0, 2)
        return distributions

    def _step(self, state, previous: np.ndarray, position: int) -> np.ndarray:
        chunk = next(index for index, (start, length) in enumerate(self.chunks) if position < start + length)
        start, length = self.chunks[chunk]
        before = np.zeros((self.batch, length), np.int32)
        before[:, position - start] = previous
        return self._call(state, chunk, before, position, 1)[position - start].astype(np.float64)
