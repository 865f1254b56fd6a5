"""The codec's integer decoder (`vqvae_faces.integer_decoder`): equal to an oracle of the same arithmetic in
Python integers (NumPy object arrays: exact sums, no float64), close to the float decoder for every
activation and output, and its tables and pixel thresholds what they claim."""

import math

import keras
import numpy as np
import pytest

from vqvae_class_keras import VQVAE
from vqvae_faces import integer_arithmetic as ia
from vqvae_faces.integer_arithmetic import FRACTION_BITS
from vqvae_faces.integer_decoder import IntegerDecoder

K = 16


def tiny_vqvae(activation="silu", output_activation="sigmoid", seed=0):
    keras.utils.set_random_seed(seed)
    vqvae = VQVAE(
        image_channels=3,
        embedding_dim=4,
        num_embeddings=K,
        seed=1,
        ssim_weight=0.0,
        encoder_filters=[8, 16],
        decoder_filters=[16, 8],
        num_residual_blocks=1,
        residual_hidden_channels=8,
        activation=activation,
        output_activation=output_activation,
    )
    vqvae.build((None, 16, 16, 3))
    rng = np.random.default_rng(seed)
    vqvae.quantizer.embeddings.assign(rng.normal(0, 1, (K, 4)).astype(np.float32))
    for weight in vqvae.decoder.weights:  # biases away from zero, kernels of a trained decoder's spread
        weight.assign(weight.numpy() * 2 + rng.normal(0, 0.05, weight.shape).astype(np.float32))
    return vqvae


def rshift(values, bits: int):
    return [(v + (1 << (bits - 1))) >> bits if bits > 0 else v << -bits for v in values]


def oracle_columns(kernel: np.ndarray):
    """Integer kernel (object array, last axis the columns) and each column's shift, from the float weights."""
    flat = kernel.reshape(-1, kernel.shape[-1]).astype(np.float64)
    shifts = [ia.WEIGHT_BITS - 1 - math.frexp(float(np.abs(flat[:, j]).max()))[1] for j in range(flat.shape[1])]
    integers = np.array(
        [[round(math.ldexp(float(w), shifts[j])) for j, w in enumerate(row)] for row in flat], dtype=object
    )
    return integers.reshape(kernel.shape), shifts


def oracle_convolution(x: np.ndarray, layer, upsample: bool) -> np.ndarray:
    """The layer's output in Python integers: every tap's products summed exactly, each column shifted once."""
    kernel, bias = layer.get_weights()
    if upsample:
        kernel = kernel.transpose(0, 1, 3, 2)
    integers, shifts = oracle_columns(kernel)
    batch, rows, columns, channels = x.shape
    size, out = kernel.shape[0], kernel.shape[-1]
    bound = (1 << (53 - ia.WEIGHT_BITS - max(1, math.ceil(math.log2(channels))))) - 1
    x = np.clip(x, -bound, bound).astype(object)
    height, width = (2 * rows, 2 * columns) if upsample else (rows, columns)
    total = np.zeros((batch, height, width, out), dtype=object)
    for ky in range(size):
        for kx in range(size):
            for i in range(rows):
                for j in range(columns):
                    if upsample:  # input (i, j) through tap (ky, kx) reaches (2i + ky - 1, 2j + kx - 1)
                        y, z, source = 2 * i + ky - 1, 2 * j + kx - 1, x[:, i, j]
                    else:  # output (i, j) reads input (i + ky - size // 2, j + kx - size // 2)
                        y, z = i, j
                        a, b = i + ky - size // 2, j + kx - size // 2
                        source = x[:, a, b] if 0 <= a < rows and 0 <= b < columns else None
                    if source is not None and 0 <= y < height and 0 <= z < width:
                        total[:, y, z] += source.dot(integers[ky, kx])
    biases = [round(float(b) * (1 << FRACTION_BITS)) for b in bias]
    result = np.empty_like(total)
    for c in range(out):
        result[..., c] = (
            np.array(rshift(total[..., c].ravel().tolist(), shifts[c]), dtype=object).reshape(total.shape[:-1])
            + biases[c]
        )
    return result.astype(np.int64)


def oracle_activation(name: str, x: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(x, 0)
    limit = ia.SIGMOID_RANGE << FRACTION_BITS
    table, step = ia.silu_table(), FRACTION_BITS - ia.TABLE_STEP_BITS
    out = []
    for value in x.ravel().tolist():
        offset = max(-limit, min(limit, value)) + limit
        index = min(offset >> step, len(table) - 2)
        below, above = int(table[index]), int(table[index + 1])
        interpolated = below + rshift([(above - below) * (offset - (index << step))], step)[0]
        out.append(value if value > limit else interpolated)
    return np.array(out, np.int64).reshape(x.shape)


def oracle_pixels(vqvae, tokens: np.ndarray) -> np.ndarray:
    decoder, name = vqvae.decoder, vqvae.decoder.activation
    embeddings = vqvae.quantizer.embeddings.numpy()
    codebook = np.array([[round(float(v) * (1 << FRACTION_BITS)) for v in row] for row in embeddings])
    x = oracle_convolution(codebook[tokens], decoder.mix, False)
    for block in decoder.blocks:
        hidden = oracle_convolution(oracle_activation(name, x), block.conv_3x3, False)
        x = x + oracle_convolution(oracle_activation(name, hidden), block.conv_1x1, False)
    x = oracle_activation(name, x)
    for layer in decoder.upsamplers:
        x = oracle_activation(name, oracle_convolution(x, layer, True))
    x = oracle_convolution(x, decoder.to_image, True)
    if decoder.output_activation == "clip":
        return np.clip(np.array(rshift((x * 255).ravel().tolist(), FRACTION_BITS)).reshape(x.shape), 0, 255)
    thresholds = ia.pixel_thresholds().tolist()
    return np.array([sum(value >= t for t in thresholds) for value in x.ravel().tolist()]).reshape(x.shape)


@pytest.mark.parametrize("activation, output_activation", [("silu", "sigmoid"), ("relu", "clip")])
def test_the_integer_decoder_equals_a_python_integer_oracle(activation, output_activation):
    vqvae = tiny_vqvae(activation, output_activation)
    tokens = np.random.default_rng(1).integers(0, K, (2, 4, 4))
    np.testing.assert_array_equal(IntegerDecoder(vqvae).pixels(tokens), oracle_pixels(vqvae, tokens))


@pytest.mark.parametrize(
    "activation, output_activation", [("silu", "sigmoid"), ("relu", "sigmoid"), ("gelu", "clip"), ("silu", "clip")]
)
def test_the_integer_pixels_are_the_float_decoders_to_within_a_level(activation, output_activation):
    """The Conv2DTranspose geometry, the activations and the outputs as Keras computes them: at most one level
    apart where the float output lies near a rounding boundary, and nearly every pixel equal."""
    vqvae = tiny_vqvae(activation, output_activation, seed=2)
    tokens = np.random.default_rng(3).integers(0, K, (8, 4, 4))
    floats = np.round(np.clip(vqvae.decode_tokens(tokens).numpy(), 0, 1) * 255).astype(int)
    integers = IntegerDecoder(vqvae).pixels(tokens).astype(int)
    assert np.abs(integers - floats).max() <= 1
    assert (integers == floats).mean() > 0.99
    assert floats.std() > 20, "the faces must spread over the levels for this test to mean anything"


def test_the_pixel_thresholds_step_the_rounded_sigmoid():
    """round(255 sigmoid(x)) reaches k exactly at threshold k: checked in float64 where no tie is near."""
    thresholds = ia.pixel_thresholds()
    assert len(thresholds) == 255 and (np.diff(thresholds) > 0).all()
    for k, threshold in enumerate(thresholds, start=1):
        for x, expected in ((threshold, k), (threshold - 1, k - 1)):
            value = 255 / (1 + math.exp(-x / 2**FRACTION_BITS))
            if abs(value - math.floor(value) - 0.5) > 1e-9:
                assert math.floor(value + 0.5) == expected, (k, x)
    assert (ia.sigmoid_pixels(np.array([-(1 << 40), 0, 1 << 40])) == [0, 128, 255]).all()


def test_the_silu_table_is_silu_rounded():
    table = ia.silu_table()
    x = (np.arange(len(table)) - len(table) // 2) * 2.0**-ia.TABLE_STEP_BITS
    expected = x / (1 + np.exp(-x)) * 2**FRACTION_BITS
    assert np.abs(table - expected).max() <= 0.5 + 1e-6 and (table == np.round(expected)).mean() > 0.999
