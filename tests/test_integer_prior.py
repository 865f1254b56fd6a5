"""The codec's integer prior (`vqvae_faces.integer_prior`): equal bit for bit to a scalar oracle of the same
arithmetic in Python integers (exact at any size, no float64 sums, no vectorised shifts), the same on the
cached path as in the full pass, close to the float model, and exact at the bounds its clipping allows."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from vqvae_faces import integer_arithmetic as ia
from vqvae_faces.integer_arithmetic import FRACTION_BITS
from vqvae_faces.integer_prior import IntegerPrior
from vqvae_faces.token_prior import CausalTransformer

K = 7


def rshift(value: int, bits: int) -> int:
    return (value + (1 << (bits - 1))) >> bits if bits > 0 else value << -bits


def rdiv(numerator: int, denominator: int) -> int:
    return (2 * numerator + denominator) // (2 * denominator)


def clip(value: int, bits: int) -> int:
    bound = (1 << bits) - 1
    return max(-bound, min(bound, value))


def quantized(value) -> int:
    return round(float(value) * (1 << FRACTION_BITS))  # half to even, as np.rint


def dense(x: list[int], kernel: np.ndarray, bias: np.ndarray) -> list[int]:
    rows, columns = kernel.shape
    input_bits = 53 - ia.WEIGHT_BITS - max(1, math.ceil(math.log2(rows)))
    out = []
    for j in range(columns):
        shift = ia.WEIGHT_BITS - 1 - math.frexp(float(np.abs(kernel[:, j]).max()))[1]
        weights = [round(math.ldexp(float(w), shift)) for w in kernel[:, j]]
        total = sum(clip(value, input_bits) * weight for value, weight in zip(x, weights))
        out.append(rshift(total, shift) + quantized(bias[j]))
    return out


def layer_norm(x: list[int], layer) -> list[int]:
    gamma, beta = (w.numpy() for w in layer.weights)
    width = len(x)
    x = [clip(value, 50 - math.ceil(math.log2(width))) for value in x]
    deviations = [value * width - sum(x) for value in x]
    epsilon = layer.epsilon * width**2 * 2.0 ** (2 * FRACTION_BITS)
    smallest = -((52 - math.frexp(epsilon)[1]) // 2)
    shift = max(math.frexp(float(max(abs(d) for d in deviations)))[1] - ia.LAYER_NORM_BITS, smallest)
    scaled = [rshift(d, shift) for d in deviations]
    variance = sum(s * s for s in scaled) // width + round(math.ldexp(epsilon, -2 * shift))
    root = math.isqrt(variance)
    return [
        rshift(rdiv(s << FRACTION_BITS, root) * quantized(g), FRACTION_BITS) + quantized(b)
        for s, g, b in zip(scaled, gamma, beta)
    ]


def exp_weights(scores: list[int]) -> list[int]:
    table = ia.exp_table()
    top = max(scores)
    return [int(table[min(rshift(top - s, FRACTION_BITS - ia.TABLE_STEP_BITS), len(table) - 1)]) for s in scores]


def gelu(value: int) -> int:
    """The table at value, linearly interpolated."""
    limit, step, table = ia.GELU_RANGE << FRACTION_BITS, FRACTION_BITS - ia.TABLE_STEP_BITS, ia.gelu_table()
    if value > limit:
        return value
    offset = max(-limit, min(limit, value)) + limit
    index = min(offset >> step, len(table) - 2)
    below, above = int(table[index]), int(table[index + 1])
    return below + rshift((above - below) * (offset - (index << step)), step)


def oracle_logits(prior, grid: list[int]) -> list[list[int]]:
    """Every position's logits of one grid, position by position, in Python integers."""
    columns, length = prior.grid_size[1], len(grid)
    embed, start, row_embed, column_embed = (
        layer.get_weights()[0] for layer in (prior.embed, prior.start, prior.row_embed, prior.column_embed)
    )
    xs = []
    for position in range(length):
        token = embed[grid[position - 1]] if position else start[0]
        xs.append(
            [
                quantized(a) + (quantized(b) + quantized(c))
                for a, b, c in zip(token, row_embed[position // columns], column_embed[position % columns])
            ]
        )
    for block in prior.blocks:
        head_width = block.width // block.num_heads
        scale = math.isqrt((1 << 4 * FRACTION_BITS) // head_width) >> FRACTION_BITS
        key_bits = (53 - max(1, math.ceil(math.log2(head_width)))) // 2
        value_bits = 53 - ia.EXP_BITS - max(1, math.ceil(math.log2(length)))
        qkv = [dense(layer_norm(x, block.norm_1), *block.qkv.get_weights()) for x in xs]
        attended = [[0] * block.width for _ in range(length)]
        for head in range(block.num_heads):
            part = slice(head * head_width, (head + 1) * head_width)
            for p in range(length):
                query = [clip(rshift(q * scale, FRACTION_BITS), key_bits) for q in qkv[p][: block.width][part]]
                keys = [[clip(k, key_bits) for k in qkv[j][block.width : 2 * block.width][part]] for j in range(p + 1)]
                values = [[clip(v, value_bits) for v in qkv[j][2 * block.width :][part]] for j in range(p + 1)]
                scores = [rshift(sum(q * k for q, k in zip(query, key)), FRACTION_BITS) for key in keys]
                weights = exp_weights(scores)
                for i in range(head_width):
                    total = sum(w * value[i] for w, value in zip(weights, values))
                    attended[p][head * head_width + i] = rdiv(total, sum(weights))
        xs = [[a + b for a, b in zip(x, dense(out, *block.project.get_weights()))] for x, out in zip(xs, attended)]
        hidden = [[gelu(h) for h in dense(layer_norm(x, block.norm_2), *block.mlp_in.get_weights())] for x in xs]
        xs = [[a + b for a, b in zip(x, dense(h, *block.mlp_out.get_weights()))] for x, h in zip(xs, hidden)]
    return [dense(layer_norm(x, prior.norm), *prior.head.get_weights()) for x in xs]


def tiny_prior(grid, seed, scale, **settings):
    """A tiny transformer whose weights are the initialiser's times `scale` plus noise of scale / 10: sharper
    distributions and larger activations than the initialiser's, as after training."""
    keras.utils.set_random_seed(seed)
    prior = CausalTransformer(K, grid, **{"width": 8, "num_heads": 2, "num_layers": 2, "mlp_ratio": 2, **settings})
    prior(np.zeros((1, *grid), np.int32))
    for weight in prior.weights:
        weight.assign(weight.numpy() * scale + np.random.default_rng(seed).normal(0, scale / 10, weight.shape))
    return prior


@pytest.mark.parametrize("seed", [0, 1])
def test_the_integer_pass_equals_a_python_integer_oracle_bit_for_bit(seed):
    prior = tiny_prior((3, 3), seed, scale=3.0)  # activations up to a few hundred
    tokens = np.random.default_rng(seed).integers(0, K, (2, 9))
    tokens[0, :3] = [0, K - 1, 0]
    logits = IntegerPrior(prior).logits(tokens)
    for grid, grid_logits in zip(tokens, logits):
        assert grid_logits.tolist() == oracle_logits(prior, grid.tolist())


def test_the_cached_step_equals_the_full_pass_and_both_stay_close_to_the_float_model():
    """A 9x10 grid: position by position with cached keys and values, the same integers as the full pass;
    their distributions within 1% of the float model's probabilities, their code lengths within 0.1%."""
    grid = (9, 10)
    prior = tiny_prior(grid, 2, scale=1.5, width=16)
    integer = IntegerPrior(prior)
    tokens = np.random.default_rng(3).integers(0, K, (3, 90))
    full = integer.logits(tokens)
    cache, previous = integer.new_cache(3), -np.ones(3, np.int64)
    for position in range(90):
        np.testing.assert_array_equal(integer.step(cache, previous, position), full[:, position])
        previous = tokens[:, position]
    exact = IntegerPrior.distributions(full)
    floats = tf.nn.softmax(prior(tokens.reshape(3, *grid))).numpy().reshape(3, 90, K)
    np.testing.assert_allclose(exact, floats, rtol=1e-2, atol=1e-6)
    chosen = np.take_along_axis(exact, tokens[..., None], -1), np.take_along_axis(floats, tokens[..., None], -1)
    bits = [-np.log2(p).sum() for p in chosen]
    assert abs(bits[0] / bits[1] - 1) < 1e-3


def test_the_tables_are_exp_and_gelu_rounded():
    """The tables built with `decimal` against the float64 library functions: equal to their rounding except
    where a value lies within float64's error of a half unit."""
    step = 2.0**-ia.TABLE_STEP_BITS
    exp = ia.exp_table()
    expected = np.array([math.exp(-i * step) * 2**ia.EXP_BITS for i in range(len(exp))])
    assert np.abs(exp - expected).max() <= 0.5 + 1e-9 and (exp == np.round(expected)).mean() > 0.999
    assert exp[0] == 1 << ia.EXP_BITS and exp[-1] == 0
    gelu_values = ia.gelu_table()
    x = (np.arange(len(gelu_values)) - len(gelu_values) // 2) * step
    expected = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x]) * 2**FRACTION_BITS
    assert np.abs(gelu_values - expected).max() <= 0.5 + 1e-6 and (gelu_values == np.round(expected)).mean() > 0.999


def test_products_at_the_clip_bounds_stay_exact():
    """The largest inputs a dense layer or the attention lets through, against the widest weights: the float64
    BLAS product equals the exact integer one, where float32 or a sum past 2^53 would not."""
    rng = np.random.default_rng(4)
    rows = 512
    kernel = rng.normal(0, 1, (rows, 5)).astype(np.float32)
    layer = ia.Dense(kernel, np.zeros(5, np.float32))
    bound = (1 << layer.input_bits) - 1
    x = rng.choice([-bound, bound, bound - 12345], (3, rows)) + rng.integers(-(1 << 20), 1 << 20, (3, rows))
    x[0] = bound  # every term at the bound: the largest sum the layer allows
    expected = [dense(list(map(int, row)), kernel, np.zeros(5)) for row in x]
    assert layer(x[:, None, :])[:, 0].tolist() == expected
    weights = layer.kernel.astype(np.int64)
    assert np.abs(weights).max() <= 1 << (ia.WEIGHT_BITS - 1)
    assert (np.abs(x[0][:, None] * weights).sum(axis=0) < 2**53).all()


def test_layer_norm_keeps_its_precision_for_tiny_and_huge_rows():
    """Rows of spread 0.1 and 1e3 normalise to within a few units of the float computation on the same quantized
    inputs (the deviations are scaled to a fixed number of bits first), and a constant row to beta."""
    layer = keras.layers.LayerNormalization(epsilon=1e-5)
    layer.build((None, 64))
    layer.set_weights([np.linspace(0.5, 1.5, 64).astype(np.float32), np.linspace(-1, 1, 64).astype(np.float32)])
    rng = np.random.default_rng(5)
    rows = ia.quantized(np.stack([rng.normal(3, 0.1, 64), rng.normal(-20, 1e3, 64), np.full(64, 7.0)]))
    integer = ia.LayerNorm.of(layer)(rows)
    floats = layer(rows / 2**FRACTION_BITS).numpy()
    np.testing.assert_allclose(integer / 2**FRACTION_BITS, floats, atol=4 / 2**FRACTION_BITS)
    np.testing.assert_allclose(integer[2] / 2**FRACTION_BITS, layer.get_weights()[1], atol=1 / 2**FRACTION_BITS)
    assert [layer_norm(list(map(int, row)), layer) for row in rows] == integer.tolist()
