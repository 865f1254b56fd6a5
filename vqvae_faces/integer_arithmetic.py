"""Integer arithmetic for the codec's networks (`integer_prior.py`, `integer_decoder.py`): the same bits on
every computer.

A range decoder must see exactly the probabilities the encoder saw, and a face file should decode to
the same pixels everywhere. Float32 networks do not give that across computers: the order of a sum,
fused multiply-adds and the approximations of exp and erf change with the instruction set, the
thread count and the library version, and a last-bit difference sends the range decoder astray (or
a pixel to the next level). Here every value the codec reads is an integer computed by operations
whose result is defined exactly (Ballé, Johnston and Minnen 2019, "Integer networks for data
compression", quantize a trained network the same way):

  * activations are int64 in units of 2^-FRACTION_BITS; each weight column is a signed integer of
    WEIGHT_BITS bits times a power of two, taken from the float32 weights by `np.frexp`, a power-
    of-two scaling and `np.rint` (exact, or rounded as IEEE 754 defines, on every computer);
  * a matrix product runs in float64 BLAS on integer-valued operands, each clipped so that every
    product and every partial sum is an integer below 2^53: float64 represents all of them, so
    every addition is exact and the result is the same in any order, with or without FMA;
  * rescaling is a rounding shift, a mean or a ratio an integer division, a square root
    `np.sqrt` corrected to the exact integer floor, and exp, GELU and SiLU are tables read by index,
    built once with Python's `decimal` (whose exp and arithmetic are correctly rounded by
    specification, hence the same everywhere);
  * the range coder gets each distribution as integer weights divided by their sum in float64 (one
    correctly rounded division per entry); pixels are integers from the start.

Rounding float outputs to a coarse grid would not do: a value near a rounding boundary still rounds
differently on two computers. The integer networks closely approximate the float ones (the codec's
extra bits: `bench/bench_codec.py`); training, evaluation and sampling keep the float models.

Every constant and operation here is part of `.vqf` format versions 2 and 3: a change to any of them changes
the probabilities, so files written before would no longer decode (or the pixels they decode to), and
needs a new format version (`tests/data/saved_run/vqf2` holds files that catch it).
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
SIGMOID_RANGE = 16  # sigmoid(x) = 1 above 16 and 0 below -16 in SiLU (e^-16 x 16 < 2^-16)
TABLE_STEP_BITS = 10  # tables of exp (read at the nearest entry), GELU and SiLU (interpolated) every 2^-10
LAYER_NORM_BITS = 26  # a row's deviations from its mean are scaled to about 2^26 before its variance
# A masked attention score: below every real one, yet any score minus it fits in int64.
INVALID_SCORE = -(1 << 62)
# Decimal digits of the tables' arithmetic: the GELU series cancels terms up to about 10^14.
TABLE_DIGITS = 40


def round_shift(values: np.ndarray, bits) -> np.ndarray:
    """values x 2^-bits, rounded half up, for int64 `values` and integer `bits` (any sign; an array of them
    broadcasts)."""
    if isinstance(bits, int):
        return (values + (1 << (bits - 1))) >> bits if bits > 0 else values << -bits
    right = np.maximum(bits, 0)
    rounded = (values + np.where(right > 0, np.left_shift(1, np.maximum(right - 1, 0)), 0)) >> right
    return rounded << np.maximum(-bits, 0)


def round_divide(numerators: np.ndarray, denominators: np.ndarray) -> np.ndarray:
    """numerators / denominators rounded half up, for int64 arrays with positive denominators."""
    return (2 * numerators + denominators) // (2 * denominators)


def floor_sqrt(values: np.ndarray) -> np.ndarray:
    """floor(sqrt(values)) of int64 values below 2^53: the float64 root, corrected to the exact integer."""
    roots = np.sqrt(values.astype(np.float64)).astype(np.int64)  # the floor, or one off near a square
    roots -= roots * roots > values
    roots += (roots + 1) * (roots + 1) <= values
    return roots


def clip_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """values clipped to magnitudes below 2^bits."""
    bound = (1 << bits) - 1
    return np.minimum(np.maximum(values, -bound), bound)


def exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b of integer-valued float64 arrays whose every partial sum is below 2^53 (the caller clips):
    exact, in any summation order. Returns int64."""
    return np.matmul(a, b).astype(np.int64)


def operand_bits(other_bits: int, terms: int) -> int:
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


def exp_weights(scores: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """exp(score - the row's largest valid score) in units of 2^-EXP_BITS, from the table at the nearest
    entry (its last entry is 0), 0 where not `valid` (broadcast to `scores`; None: all are): int64 of
    `scores`' shape, the last axis the row."""
    if valid is not None:
        scores = np.where(valid, scores, INVALID_SCORE)
    table = exp_table()
    below = scores.max(axis=-1, keepdims=True) - scores
    index = round_shift(below, FRACTION_BITS - TABLE_STEP_BITS)
    return table[np.minimum(index, len(table) - 1, out=index)]


@functools.cache
def _sigmoids() -> list[Decimal]:
    """sigmoid(x) = 1 / (1 + e^-x) for x = 0 .. SIGMOID_RANGE every 2^-TABLE_STEP_BITS, in `decimal`."""
    with localcontext() as context:
        context.prec = TABLE_DIGITS
        step = Decimal(2) ** -TABLE_STEP_BITS
        return [1 / (1 + (-(step * i)).exp()) for i in range((SIGMOID_RANGE << TABLE_STEP_BITS) + 1)]


def _from_sigmoids(value) -> np.ndarray:
    """round(value(x, sigmoid(x))) for x = -SIGMOID_RANGE .. SIGMOID_RANGE every 2^-TABLE_STEP_BITS, int64
    (sigmoid(-x) = 1 - sigmoid(x))."""
    with localcontext() as context:
        context.prec = TABLE_DIGITS
        step, sigmoids = Decimal(2) ** -TABLE_STEP_BITS, _sigmoids()
        count = len(sigmoids) - 1
        pairs = [(-step * i, 1 - sigmoids[i]) for i in range(count, 0, -1)] + [
            (step * i, sigmoids[i]) for i in range(count + 1)
        ]
        return np.array([int(value(x, s).to_integral_value("ROUND_HALF_UP")) for x, s in pairs], np.int64)


@functools.cache
def silu_table() -> np.ndarray:
    """round(x sigmoid(x) 2^FRACTION_BITS) at the sigmoid table's points (see `_from_sigmoids`)."""
    unit = Decimal(2) ** FRACTION_BITS
    return _from_sigmoids(lambda x, sigmoid: x * sigmoid * unit)


@functools.cache
def pixel_thresholds() -> np.ndarray:
    """The 255 sigmoid inputs, in units of 2^-FRACTION_BITS rounded up, at which round(255 sigmoid(x)) (half up)
    steps to 1, 2, ... 255: logit((k - 1/2) / 255), by `decimal`'s correctly rounded ln."""
    with localcontext() as context:
        context.prec = TABLE_DIGITS
        unit = Decimal(2) ** FRACTION_BITS
        return np.array(
            [
                int((((2 * k - 1) / Decimal(511 - 2 * k)).ln() * unit).to_integral_value("ROUND_CEILING"))
                for k in range(1, 256)
            ],
            np.int64,
        )


def _interpolated(table: np.ndarray, x: np.ndarray, limit: int) -> np.ndarray:
    """A table of the points -limit .. limit every 2^-TABLE_STEP_BITS, linearly interpolated at x (clipped)."""
    limit <<= FRACTION_BITS
    offset = np.minimum(np.maximum(x, -limit), limit) + limit
    bits = FRACTION_BITS - TABLE_STEP_BITS
    index = np.minimum(offset >> bits, len(table) - 2)
    below = table[index]
    return below + round_shift((table[index + 1] - below) * (offset - (index << bits)), bits)


def gelu(x: np.ndarray) -> np.ndarray:
    """x Phi(x), from its table linearly interpolated."""
    return np.where(x > GELU_RANGE << FRACTION_BITS, x, _interpolated(gelu_table(), x, GELU_RANGE))


def silu(x: np.ndarray) -> np.ndarray:
    """x sigmoid(x), from its table linearly interpolated (the decoder's pixels depend on it closely)."""
    return np.where(x > SIGMOID_RANGE << FRACTION_BITS, x, _interpolated(silu_table(), x, SIGMOID_RANGE))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


ACTIVATIONS = {"relu": relu, "silu": silu, "gelu": gelu}


def sigmoid_pixels(x: np.ndarray) -> np.ndarray:
    """uint8 pixels round(255 sigmoid(x)) of outputs x, exactly: how many of the pixel thresholds x reaches."""
    return np.searchsorted(pixel_thresholds(), x, side="right").astype(np.uint8)


def clipped_pixels(x: np.ndarray) -> np.ndarray:
    """uint8 pixels of linear outputs x, clipped to [0, 1]."""
    return np.clip(round_shift(x * 255, FRACTION_BITS), 0, 255).astype(np.uint8)


def quantized(values: np.ndarray) -> np.ndarray:
    """Float values as integers in units of 2^-FRACTION_BITS (int64)."""
    return np.rint(np.ldexp(values.astype(np.float64), FRACTION_BITS)).astype(np.int64)


class _Columns:
    """Weights whose last axis is the output columns: each column integers of at most 2^(WEIGHT_BITS - 1)
    times 2^-shift (its own power of two), as integer-valued float64; and the rounding of an exact integer
    product back to activations, plus the bias."""

    def __init__(self, kernel: np.ndarray, bias: np.ndarray):
        kernel = kernel.astype(np.float64)
        _, exponents = np.frexp(np.abs(kernel).reshape(-1, kernel.shape[-1]).max(axis=0))  # column's |w| < 2^exponent
        shifts = (WEIGHT_BITS - 1 - exponents).astype(np.int64)
        self.kernel = np.rint(np.ldexp(kernel, shifts))
        # the rounding shift per column, split as round_shift does (a shift < 1 only for weights of 2^14 or more)
        self.right, self.left = np.maximum(shifts, 0), np.maximum(-shifts, 0)
        self.half = np.where(self.right > 0, np.left_shift(1, np.maximum(self.right - 1, 0)), 0)
        self.any_left = bool(self.left.any())
        self.bias = quantized(bias)

    def _rescaled(self, product: np.ndarray) -> np.ndarray:
        product += self.half
        product >>= self.right
        if self.any_left:
            product <<= self.left
        return product + self.bias


class Dense(_Columns):
    """x @ kernel + bias on activations (..., k) in units of 2^-FRACTION_BITS."""

    def __init__(self, kernel: np.ndarray, bias: np.ndarray):
        super().__init__(kernel, bias)
        self.input_bits = operand_bits(WEIGHT_BITS, kernel.shape[0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        rows = clip_bits(x, self.input_bits).reshape(-1, x.shape[-1]).astype(np.float64)
        return self._rescaled(exact_matmul(rows, self.kernel).reshape(*x.shape[:-1], -1))


class Convolution(_Columns):
    """Keras' Conv2D with `padding="same"` and stride 1 (odd kernel sizes), or, with `upsample`, its
    Conv2DTranspose with `padding="same"`, a 4x4 kernel and stride 2, on activations (B, h, w, C).

    Each kernel tap is an exact integer product (C terms); the taps are summed in int64 and rounded once.

    Args:
        kernel: Conv2D's (kh, kw, C, out) or Conv2DTranspose's (4, 4, out, C) float weights.
        bias: (out,).
        upsample: whether this is the Conv2DTranspose.
    """

    def __init__(self, kernel: np.ndarray, bias: np.ndarray, upsample: bool = False):
        if upsample:
            if kernel.shape[:2] != (4, 4):
                raise ValueError(f"upsampling takes a 4x4 kernel, received kernel shape {kernel.shape}")
            kernel = kernel.transpose(0, 1, 3, 2)
        elif kernel.shape[0] % 2 == 0 or kernel.shape[0] != kernel.shape[1]:
            raise ValueError(f"a convolution takes an odd square kernel, received kernel shape {kernel.shape}")
        super().__init__(kernel, bias)
        self.upsample = upsample
        self.input_bits = operand_bits(WEIGHT_BITS, kernel.shape[2])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        batch, rows, columns, channels = x.shape
        flat = clip_bits(x, self.input_bits).reshape(-1, channels).astype(np.float64)
        size = self.kernel.shape[0]
        if self.upsample:
            # input (i, j) through tap (ky, kx) reaches output (2i + ky - 1, 2j + kx - 1); the sums are kept
            # one position wider on each side, then cropped
            total = np.zeros((batch, 2 * rows + 2, 2 * columns + 2, self.kernel.shape[-1]), np.int64)
            for ky in range(size):
                for kx in range(size):
                    product = exact_matmul(flat, self.kernel[ky, kx]).reshape(batch, rows, columns, -1)
                    total[:, ky : ky + 2 * rows : 2, kx : kx + 2 * columns : 2] += product
            return self._rescaled(total[:, 1:-1, 1:-1])
        half = size // 2
        padded = np.pad(x, ((0, 0), (half, half), (half, half), (0, 0)))
        padded = clip_bits(padded, self.input_bits).astype(np.float64)
        total = np.zeros((batch, rows, columns, self.kernel.shape[-1]), np.int64)
        for ky in range(size):
            for kx in range(size):
                window = padded[:, ky : ky + rows, kx : kx + columns].reshape(-1, channels)
                total += exact_matmul(window, self.kernel[ky, kx]).reshape(batch, rows, columns, -1)
        return self._rescaled(total)


class LayerNorm:
    """(x - mean) / sqrt(variance + epsilon) x gamma + beta over the last axis, in integers. The deviations
    are kept exact as width x (x - mean) = width x - sum(x), then scaled by a power of two to about
    2^LAYER_NORM_BITS, so the variance's square root keeps about 21 bits wherever the row's values lie."""

    def __init__(self, gamma: np.ndarray, beta: np.ndarray, epsilon: float):
        self.gamma, self.beta = quantized(gamma), quantized(beta)
        self.width = len(gamma)
        self.input_bits = 50 - math.ceil(math.log2(self.width))  # width x stays below 2^50
        # epsilon in the units of the deviations' squares before scaling; they are scaled up at most so far that
        # it stays below 2^52 in the units after
        self.epsilon = epsilon * self.width**2 * 2.0 ** (2 * FRACTION_BITS)
        self.smallest_shift = -((52 - math.frexp(self.epsilon)[1]) // 2)

    @classmethod
    def of(cls, layer) -> "LayerNorm":
        """The integer version of a Keras `LayerNormalization` layer."""
        return cls(*(weight.numpy() for weight in layer.weights), layer.epsilon)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = clip_bits(x, self.input_bits)
        deviations = x * self.width - x.sum(axis=-1, keepdims=True)
        largest = np.abs(deviations).max(axis=-1, keepdims=True)
        _, exponents = np.frexp(largest.astype(np.float64))  # largest < 2^exponent (exact: largest < 2^53)
        shifts = np.maximum(exponents.astype(np.int64) - LAYER_NORM_BITS, self.smallest_shift)
        scaled = round_shift(deviations, shifts)
        epsilon = np.rint(np.ldexp(self.epsilon, -2 * shifts)).astype(np.int64)
        variance = (scaled * scaled).sum(axis=-1, keepdims=True) // self.width + epsilon
        normalized = round_divide(scaled << FRACTION_BITS, floor_sqrt(variance))
        return round_shift(normalized * self.gamma, FRACTION_BITS) + self.beta
