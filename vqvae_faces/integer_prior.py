"""A `CausalTransformer`'s forward pass in integer arithmetic: the codec's probabilities, the same
bits on every computer.

A range decoder must see exactly the probabilities the encoder saw. A float32 transformer does not
give them across computers: the order of a sum, fused multiply-adds and the approximations of exp
and erf change with the instruction set, the thread count and the library version, and a last-bit
difference sends the decoder astray. Here every value the codec reads is an integer computed by
operations whose result is defined exactly (Ballé, Johnston and Minnen 2019, "Integer networks for
data compression", quantize a trained network the same way):

  * activations are int64 in units of 2^-FRACTION_BITS; each weight column is a signed integer of
    WEIGHT_BITS bits times a power of two, taken from the float32 weights by `np.frexp`, a power-
    of-two scaling and `np.rint` (exact, or rounded as IEEE 754 defines, on every computer);
  * a matrix product runs in float64 BLAS on integer-valued operands, each clipped so that every
    product and every partial sum is an integer below 2^53: float64 represents all of them, so
    every addition is exact and the result is the same in any order, with or without FMA;
  * rescaling is a rounding shift, a mean or a ratio an integer division, a square root
    `np.sqrt` corrected to the exact integer floor, and exp and GELU are tables read by index,
    built once with Python's `decimal` (whose exp and arithmetic are correctly rounded by
    specification, hence the same everywhere);
  * the range coder gets each distribution as integer weights divided by their sum in float64 (one
    correctly rounded division per entry).

Rounding float logits to a coarse grid would not do: a logit near a rounding boundary still rounds
differently on two computers. The integer pass is a close approximation of the float model (the
codec's extra bits: `bench/bench_codec.py`); sampling keeps the float model's fast path.

Every constant and operation here is part of `.vqf` format version 2: a change to any of them changes
the probabilities, so files written before would no longer decode, and needs a new format version
(`tests/data/saved_run/vqf2` holds files that catch it).
"""

from __future__ import annotations

import functools
import math
from decimal import Decimal, localcontext

import numpy as np

FRACTION_BITS = 16  # activations: integers in units of 2^-16
WEIGHT_BITS = 16  # each weight column: integers below 2^15 in magnitude times a power of two
EXACT_BITS = 53  # float64 holds every integer below 2^53: sums of such integers are exact
EXP_BITS = 20  # exp(x), x <= 0, in units of 2^-20: the attention's and the output's weights
EXP_RANGE = 16  # exp(x) below x = -16 is 0 at EXP_BITS (e^-16 < 2^-23)
GELU_RANGE = 8  # gelu(x) = x above 8 and 0 below -8, to far below one unit
TABLE_STEP_BITS = 10  # tables of exp and GELU every 2^-10, read at the nearest entry
LAYER_NORM_BITS = 26  # a row's deviations from its mean are scaled to about 2^26 before its variance
# A masked attention score: below every real one, yet any score minus it fits in int64.
INVALID_SCORE = -(1 << 62)
# Decimal digits of the tables' arithmetic: the GELU series cancels terms up to about 10^14.
TABLE_DIGITS = 40


def _round_shift(values: np.ndarray, bits) -> np.ndarray:
    """values x 2^-bits, rounded half up, for int64 `values` and integer `bits` (any sign; an array of them
    broadcasts)."""
    if isinstance(bits, int):
        return (values + (1 << (bits - 1))) >> bits if bits > 0 else values << -bits
    right = np.maximum(bits, 0)
    rounded = (values + np.where(right > 0, np.left_shift(1, np.maximum(right - 1, 0)), 0)) >> right
    return rounded << np.maximum(-bits, 0)


def _round_divide(numerators: np.ndarray, denominators: np.ndarray) -> np.ndarray:
    """numerators / denominators rounded half up, for int64 arrays with positive denominators."""
    return (2 * numerators + denominators) // (2 * denominators)


def _floor_sqrt(values: np.ndarray) -> np.ndarray:
    """floor(sqrt(values)) of int64 values below 2^53: the float64 root, corrected to the exact integer."""
    roots = np.sqrt(values.astype(np.float64)).astype(np.int64)  # the floor, or one off near a square
    roots -= roots * roots > values
    roots += (roots + 1) * (roots + 1) <= values
    return roots


def _clip_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """values clipped to magnitudes below 2^bits."""
    bound = (1 << bits) - 1
    return np.minimum(np.maximum(values, -bound), bound)


def _exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b of integer-valued float64 arrays whose every partial sum is below 2^53 (the caller clips):
    exact, in any summation order. Returns int64."""
    return np.matmul(a, b).astype(np.int64)


def _operand_bits(other_bits: int, terms: int) -> int:
    """The magnitude bits an operand may have when the other has `other_bits` and a product sums
    `terms` of them, so that every partial sum stays below 2^53."""
    return EXACT_BITS - other_bits - max(1, math.ceil(math.log2(terms)))


@functools.cache
def exp_table() -> np.ndarray:
    """round(exp(-i 2^-TABLE_STEP_BITS) 2^EXP_BITS) for i = 0 .. EXP_RANGE 2^TABLE_STEP_BITS, int64."""
    with localcontext() as context:
        context.prec = TABLE_DIGITS
        step, unit = Decimal(2) ** -TABLE_STEP_BITS, Decimal(2) ** EXP_BITS
        count = EXP_RANGE << TABLE_STEP_BITS
        table = np.array([int((-(step * i)).exp() * unit + Decimal("0.5")) for i in range(count + 1)], np.int64)
    assert table[-1] == 0, "EXP_RANGE must reach exp(x) below half a unit"
    return table


@functools.cache
def gelu_table() -> np.ndarray:
    """round(gelu(x) 2^FRACTION_BITS) for x = -GELU_RANGE .. GELU_RANGE every 2^-TABLE_STEP_BITS, int64,
    with gelu(x) = x Phi(x) (Keras' exact GELU), Phi by its Taylor series in `decimal` for x >= 0 and
    gelu(-x) = gelu(x) - x (x 2^FRACTION_BITS is an integer, so the rounding is the same)."""
    with localcontext() as context:
        context.prec = TABLE_DIGITS
        step, unit, count = Decimal(2) ** -TABLE_STEP_BITS, Decimal(2) ** FRACTION_BITS, GELU_RANGE << TABLE_STEP_BITS
        inverse_root_two_pi, smallest_term = 1 / (2 * _pi()).sqrt(), Decimal(10) ** -(TABLE_DIGITS - 15)
        positive = []
        for i in range(count + 1):
            x = step * i
            # Phi(x) = 1/2 + (2 pi)^-1/2 sum_n (-1)^n x^(2n+1) / (2^n n! (2n+1))
            term, total, n = x, Decimal(0), 0
            while n == 0 or abs(term) > smallest_term:
                total += term / (2 * n + 1)
                n += 1
                term = -term * x * x / (2 * n)
            gelu = x * (Decimal("0.5") + inverse_root_two_pi * total)
            positive.append(int((gelu * unit).to_integral_value("ROUND_HALF_UP")))
    positive = np.array(positive, np.int64)
    negative = positive[:0:-1] - (np.arange(count, 0, -1, dtype=np.int64) << (FRACTION_BITS - TABLE_STEP_BITS))
    return np.concatenate([negative, positive])


def _pi() -> Decimal:
    """pi to the context's precision, by Machin's formula in `decimal` (exact arithmetic, correctly rounded)."""

    def arctan_inverse(n: int) -> Decimal:
        x, total, power, k = Decimal(1) / n, Decimal(0), Decimal(1) / n, 0
        while power:
            total += (-1) ** k * power / (2 * k + 1)
            power *= x * x
            k += 1
        return total

    return 4 * (4 * arctan_inverse(5) - arctan_inverse(239))


def _exp_weights(scores: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """exp(score - the row's largest valid score) in units of 2^-EXP_BITS, from the table at the nearest
    entry (its last entry is 0), 0 where not `valid` (broadcast to `scores`; None: all are): int64 of
    `scores`' shape, the last axis the row."""
    if valid is not None:
        scores = np.where(valid, scores, INVALID_SCORE)
    table = exp_table()
    below = scores.max(axis=-1, keepdims=True) - scores
    index = _round_shift(below, FRACTION_BITS - TABLE_STEP_BITS)
    return table[np.minimum(index, len(table) - 1, out=index)]


def _gelu(x: np.ndarray) -> np.ndarray:
    table, limit = gelu_table(), GELU_RANGE << FRACTION_BITS
    index = _round_shift(np.clip(x, -limit, limit) + limit, FRACTION_BITS - TABLE_STEP_BITS)
    return np.where(x > limit, x, table[index])


def _quantized(values: np.ndarray) -> np.ndarray:
    """Float values as integers in units of 2^-FRACTION_BITS (int64)."""
    return np.rint(np.ldexp(values.astype(np.float64), FRACTION_BITS)).astype(np.int64)


class _Dense:
    """x @ kernel + bias on activations in units of 2^-FRACTION_BITS; each kernel column integers of at most
    2^(WEIGHT_BITS - 1) times 2^-shift (its own power of two)."""

    def __init__(self, kernel: np.ndarray, bias: np.ndarray):
        kernel = kernel.astype(np.float64)
        _, exponents = np.frexp(np.abs(kernel).max(axis=0))  # largest |w| of a column < 2^exponent
        shifts = (WEIGHT_BITS - 1 - exponents).astype(np.int64)
        self.kernel = np.rint(np.ldexp(kernel, shifts[None, :]))  # integer-valued float64
        # the product's rounding shift per column, split as _round_shift does (a column's shift < 1 only
        # for weights of 2^14 or more)
        self.right, self.left = np.maximum(shifts, 0), np.maximum(-shifts, 0)
        self.half = np.where(self.right > 0, np.left_shift(1, np.maximum(self.right - 1, 0)), 0)
        self.any_left = bool(self.left.any())
        self.bias = _quantized(bias)
        self.input_bits = _operand_bits(WEIGHT_BITS, kernel.shape[0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        rows = _clip_bits(x, self.input_bits).reshape(-1, x.shape[-1]).astype(np.float64)
        product = _exact_matmul(rows, self.kernel).reshape(*x.shape[:-1], -1)
        product += self.half
        product >>= self.right
        if self.any_left:
            product <<= self.left
        return product + self.bias


class _LayerNorm:
    """(x - mean) / sqrt(variance + epsilon) x gamma + beta over the last axis, in integers. The deviations
    are kept exact as width x (x - mean) = width x - sum(x), then scaled by a power of two to about
    2^LAYER_NORM_BITS, so the variance's square root keeps about 21 bits wherever the row's values lie."""

    def __init__(self, gamma: np.ndarray, beta: np.ndarray, epsilon: float):
        self.gamma, self.beta = _quantized(gamma), _quantized(beta)
        self.width = len(gamma)
        self.input_bits = 50 - math.ceil(math.log2(self.width))  # width x stays below 2^50
        # epsilon in the units of the deviations' squares before scaling; they are scaled up at most so far that
        # it stays below 2^52 in the units after
        self.epsilon = epsilon * self.width**2 * 2.0 ** (2 * FRACTION_BITS)
        self.smallest_shift = -((52 - math.frexp(self.epsilon)[1]) // 2)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = _clip_bits(x, self.input_bits)
        deviations = x * self.width - x.sum(axis=-1, keepdims=True)
        largest = np.abs(deviations).max(axis=-1, keepdims=True)
        _, exponents = np.frexp(largest.astype(np.float64))  # largest < 2^exponent (exact: largest < 2^53)
        shifts = np.maximum(exponents.astype(np.int64) - LAYER_NORM_BITS, self.smallest_shift)
        scaled = _round_shift(deviations, shifts)
        epsilon = np.rint(np.ldexp(self.epsilon, -2 * shifts)).astype(np.int64)
        variance = (scaled * scaled).sum(axis=-1, keepdims=True) // self.width + epsilon
        normalized = _round_divide(scaled << FRACTION_BITS, _floor_sqrt(variance))
        return _round_shift(normalized * self.gamma, FRACTION_BITS) + self.beta


class _Block:
    """One pre-norm transformer block of `CausalTransformer` (`token_prior._Block`) in integers."""

    def __init__(self, block, length: int):
        self.heads, self.head_width = block.num_heads, block.width // block.num_heads
        self.norm_1 = _LayerNorm(*[w.numpy() for w in block.norm_1.weights], block.norm_1.epsilon)
        self.norm_2 = _LayerNorm(*[w.numpy() for w in block.norm_2.weights], block.norm_2.epsilon)
        self.qkv, self.project = _Dense(*block.qkv.get_weights()), _Dense(*block.project.get_weights())
        self.mlp_in, self.mlp_out = _Dense(*block.mlp_in.get_weights()), _Dense(*block.mlp_out.get_weights())
        # queries times 1 / sqrt(head width), a fraction of 2^FRACTION_BITS rounded down
        self.query_scale = math.isqrt((1 << 4 * FRACTION_BITS) // self.head_width) >> FRACTION_BITS
        self.key_bits = _operand_bits(0, self.head_width) // 2  # queries and keys alike
        self.value_bits = _operand_bits(EXP_BITS, length)

    def _heads(self, x: np.ndarray) -> np.ndarray:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.heads, self.head_width).transpose(0, 2, 1, 3)

    def attention_inputs(self, x: np.ndarray):
        """Queries and values (B, heads, n, head width) and keys, transposed (B, heads, head width, n), of
        inputs x (B, n, width): integer-valued float64, clipped so that their products are exact."""
        q, k, v = np.split(self.qkv(self.norm_1(x)), 3, axis=-1)
        q = _round_shift(self._heads(q) * self.query_scale, FRACTION_BITS)
        keys = _clip_bits(self._heads(k).transpose(0, 1, 3, 2), self.key_bits).astype(np.float64)
        values = _clip_bits(self._heads(v), self.value_bits).astype(np.float64)
        return _clip_bits(q, self.key_bits).astype(np.float64), keys, values

    def attend(self, x, queries, keys, values, valid=None) -> np.ndarray:
        """x (B, n, width) plus the attention of `queries` over the transposed `keys` and `values` where
        `valid` (broadcast to (B, heads, n, keys); None: all), then plus the MLP."""
        scores = _round_shift(_exact_matmul(queries, keys), FRACTION_BITS)
        weights = _exp_weights(scores, valid)
        attended = _round_divide(_exact_matmul(weights.astype(np.float64), values), weights.sum(-1, keepdims=True))
        batch, _, length, _ = attended.shape
        x = x + self.project(attended.transpose(0, 2, 1, 3).reshape(batch, length, -1))
        return x + self.mlp_out(_gelu(self.mlp_in(self.norm_2(x))))


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
        self.embed = _quantized(prior.embed.get_weights()[0])
        self.start = _quantized(prior.start.get_weights()[0])[0]
        self.row_embed = _quantized(prior.row_embed.get_weights()[0])
        self.column_embed = _quantized(prior.column_embed.get_weights()[0])
        self.blocks = [_Block(block, self.length) for block in prior.blocks]
        self.norm = _LayerNorm(*[w.numpy() for w in prior.norm.weights], prior.norm.epsilon)
        self.head = _Dense(*prior.head.get_weights())

    def _inputs(self, previous: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Inputs (B, n, width) at `positions` (n,) given the tokens before them (B, n), -1 = start."""
        embedded = np.where((previous < 0)[..., None], self.start, self.embed[np.maximum(previous, 0)])
        return embedded + (self.row_embed[positions // self.columns] + self.column_embed[positions % self.columns])

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits (B, L, K) of every position of the grids `tokens` (B, L), each from the tokens before it;
        a grid at a time (its attention's arrays then stay in the processor's cache)."""
        causal = np.tril(np.ones((self.length, self.length), bool))
        logits = np.empty((len(tokens), self.length, self.num_embeddings), np.int64)
        for index, grid in enumerate(tokens):
            x = self._inputs(np.concatenate([[-1], grid[:-1]])[None], np.arange(self.length))
            for block in self.blocks:
                x = block.attend(x, *block.attention_inputs(x), causal)
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
            queries, keys[..., position : position + 1], values[:, :, position : position + 1] = block.attention_inputs(
                x
            )
            x = block.attend(x, queries, keys[..., : position + 1], values[:, :, : position + 1])
        return self.head(self.norm(x))[:, 0]

    @staticmethod
    def distributions(logits: np.ndarray) -> np.ndarray:
        """The range coder's probabilities (float64, last axis K) of integer `logits`: exp-table weights over
        their sum."""
        weights = _exp_weights(logits)
        return weights / weights.sum(axis=-1, keepdims=True)
