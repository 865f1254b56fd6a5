"""A `CausalTransformer`'s forward pass in integer arithmetic (`integer_arithmetic.py`): the codec's
probabilities, the same bits on every computer, in a full pass over known grids or one position at a
time with cached keys and values.
"""

from __future__ import annotations

import math

import numpy as np

from vqvae_faces.integer_arithmetic import (
    EXP_BITS,
    FRACTION_BITS,
    Dense,
    LayerNorm,
    clip_bits,
    exact_matmul,
    exp_weights,
    gelu,
    operand_bits,
    quantized,
    round_divide,
    round_shift,
)

# Queries per block of the full pass's causal attention: a block skips the keys after its last query.
CAUSAL_BLOCK = 64


class _Block:
    """One pre-norm transformer block of `CausalTransformer` (`token_prior._Block`) in integers."""

    def __init__(self, block, length: int):
        self.heads, self.head_width = block.num_heads, block.width // block.num_heads
        self.norm_1, self.norm_2 = LayerNorm.of(block.norm_1), LayerNorm.of(block.norm_2)
        self.qkv, self.project = Dense(*block.qkv.get_weights()), Dense(*block.project.get_weights())
        self.mlp_in, self.mlp_out = Dense(*block.mlp_in.get_weights()), Dense(*block.mlp_out.get_weights())
        # queries times 1 / sqrt(head width), a fraction of 2^FRACTION_BITS rounded down
        self.query_scale = math.isqrt((1 << 4 * FRACTION_BITS) // self.head_width) >> FRACTION_BITS
        self.key_bits = operand_bits(0, self.head_width) // 2  # queries and keys alike
        self.value_bits = operand_bits(EXP_BITS, length)

    def _heads(self, x: np.ndarray) -> np.ndarray:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.heads, self.head_width).transpose(0, 2, 1, 3)

    def attention_inputs(self, x: np.ndarray):
        """Queries and values (B, heads, n, head width) and keys, transposed (B, heads, head width, n), of
        inputs x (B, n, width): integer-valued float64, clipped so that their products are exact."""
        q, k, v = np.split(self.qkv(self.norm_1(x)), 3, axis=-1)
        q = round_shift(self._heads(q) * self.query_scale, FRACTION_BITS)
        keys = clip_bits(self._heads(k).transpose(0, 1, 3, 2), self.key_bits).astype(np.float64)
        values = clip_bits(self._heads(v), self.value_bits).astype(np.float64)
        return clip_bits(q, self.key_bits).astype(np.float64), keys, values

    def _attention(self, queries, keys, values, valid=None) -> np.ndarray:
        """Each query's average of the values, weighted by exp(query . key) where `valid` (broadcast to
        (B, heads, queries, keys); None: everywhere): (B, heads, queries, head width) int64."""
        scores = round_shift(exact_matmul(queries, keys), FRACTION_BITS)
        weights = exp_weights(scores, valid)
        return round_divide(exact_matmul(weights.astype(np.float64), values), weights.sum(-1, keepdims=True))

    def attend(self, x, queries, keys, values, causal: bool = False) -> np.ndarray:
        """x (B, n, width) plus the attention of `queries` over the transposed `keys` and `values`, then plus the
        MLP. `causal`: the queries are at the keys' positions and each sees its own and the earlier ones
        (computed CAUSAL_BLOCK queries at a time, over the keys up to the block's end); else each sees all."""
        if causal:
            length = queries.shape[2]
            blocks = []
            for start in range(0, length, CAUSAL_BLOCK):
                end = min(length, start + CAUSAL_BLOCK)
                valid = np.tri(end - start, end, start, dtype=bool)  # key j <= query start + i
                blocks.append(self._attention(queries[:, :, start:end], keys[..., :end], values[:, :, :end], valid))
            attended = np.concatenate(blocks, axis=2)
        else:
            attended = self._attention(queries, keys, values)
        batch, _, length, _ = attended.shape
        x = x + self.project(attended.transpose(0, 2, 1, 3).reshape(batch, length, -1))
        return x + self.mlp_out(gelu(self.mlp_in(self.norm_2(x))))


class IntegerPrior:
    """A trained `CausalTransformer` run in integer arithmetic (see the module's docstring): a full
    pass over known grids, or one position at a time with cached keys and values; both compute the
    same integers for a position.

    Args:
        prior: the `CausalTransformer`; its float32 weights are read once.

    `logits` are int64 in units of 2^-FRACTION_BITS; `distributions` the range coder's float64.
    """

    def __init__(self, prior):
        rows, columns = prior.grid_size
        self.num_embeddings, self.length, self.columns = prior.num_embeddings, rows * columns, columns
        self.embed = quantized(prior.embed.get_weights()[0])
        self.start = quantized(prior.start.get_weights()[0])[0]
        self.row_embed = quantized(prior.row_embed.get_weights()[0])
        self.column_embed = quantized(prior.column_embed.get_weights()[0])
        self.blocks = [_Block(block, self.length) for block in prior.blocks]
        self.norm = LayerNorm.of(prior.norm)
        self.head = Dense(*prior.head.get_weights())

    def _inputs(self, previous: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Inputs (B, n, width) at `positions` (n,) given the tokens before them (B, n), -1 = start."""
        embedded = np.where((previous < 0)[..., None], self.start, self.embed[np.maximum(previous, 0)])
        return embedded + (self.row_embed[positions // self.columns] + self.column_embed[positions % self.columns])

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits (B, L, K) of every position of the grids `tokens` (B, L), each from the tokens before it;
        a grid at a time (its attention's arrays then stay in the processor's cache)."""
        logits = np.empty((len(tokens), self.length, self.num_embeddings), np.int64)
        for index, grid in enumerate(tokens):
            x = self._inputs(np.concatenate([[-1], grid[:-1]])[None], np.arange(self.length))
            for block in self.blocks:
                x = block.attend(x, *block.attention_inputs(x), causal=True)
            logits[index] = self.head(self.norm(x))[0]
        return logits

    def new_cache(self, batch: int) -> list:
        """Empty keys and values of `batch` grids for `step`: per block the keys (B, heads, head width, L)
        and the values (B, heads, L, head width)."""
        return [
            (
                np.zeros((batch, block.heads, block.head_width, self.length)),
                np.zeros((batch, block.heads, self.length, block.head_width)),
            )
            for block in self.blocks
        ]

    def step(self, cache: list, previous: np.ndarray, position: int) -> np.ndarray:
        """Logits (B, K) at `position` given the token before it (B,) (-1 at 0) and the keys and values of
        the positions before it in `cache`, into which this position's are written."""
        x = self._inputs(previous[:, None], np.array([position]))
        for block, (keys, values) in zip(self.blocks, cache):
            queries, new_keys, new_values = block.attention_inputs(x)
            keys[..., position : position + 1], values[:, :, position : position + 1] = new_keys, new_values
            x = block.attend(x, queries, keys[..., : position + 1], values[:, :, : position + 1])
        return self.head(self.norm(x))[:, 0]

    @staticmethod
    def distributions(logits: np.ndarray) -> np.ndarray:
        """The range coder's probabilities (float64, last axis K) of integer `logits`: exp-table weights over
        their sum."""
        weights = exp_weights(logits)
        return weights / weights.sum(axis=-1, keepdims=True)
