"""The residual quantizer screened in experiments/QUALITY.md (residual_vq.py), against hand-computed values."""

import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from residual_vq import ResidualVQVAE  # noqa: E402


def two_stage_model(normalize_latents=False):
    """Two stages of two 2-d codes: stage 0 {(0, 0), (1, 1)}, stage 1 {(0.1, 0), (-0.05, 0.1)}."""
    model = ResidualVQVAE(
        stages=2,
        normalize_latents=normalize_latents,
        embedding_dim=2,
        num_embeddings=2,
        encoder_filters=[4],
        decoder_filters=[4],
        num_residual_blocks=0,
        seed=0,
    )
    model.build((None, 2, 2, 3))
    model.quantizers[0].embeddings.assign([[0.0, 0.0], [1.0, 1.0]])
    model.quantizers[1].embeddings.assign([[0.1, 0.0], [-0.05, 0.1]])
    return model


@pytest.mark.parametrize("compiled", [False, True])
def test_each_stage_quantizes_what_the_stages_before_it_left(compiled):
    # z = (0.95, 1.2): stage 0 takes (1, 1) (distance^2 0.0425 against 2.3425), leaving
    # (-0.05, 0.2); stage 1 takes (-0.05, 0.1) (0.01 against 0.0625). Sum (0.95, 1.1).
    model = two_stage_model()
    latents = tf.constant([[[[0.95, 1.2]]]])
    quantize = tf.function(model.quantize_latents) if compiled else model.quantize_latents
    with tf.GradientTape() as tape:
        tape.watch(latents)
        quantized, indices, commitment, _ = quantize(latents)
        total = tf.reduce_sum(quantized * tf.constant([3.0, 5.0]))
    np.testing.assert_allclose(quantized.numpy().reshape(-1), [0.95, 1.1], atol=1e-6)
    np.testing.assert_array_equal(indices.numpy().reshape(-1), [1, 1])
    # on what all stages leave, z - sum = (0, 0.1): 0.25 x mean(0^2, 0.1^2)
    np.testing.assert_allclose(float(commitment), 0.25 * 0.01 / 2, rtol=1e-5)
    # straight-through: d(sum of codes)/dz is the identity
    np.testing.assert_allclose(tape.gradient(total, latents).numpy().reshape(-1), [3.0, 5.0])


def test_tokens_decode_to_the_model_output_and_the_config_round_trips():
    model = two_stage_model()
    images = tf.random.stateless_uniform((3, 2, 2, 3), seed=(1, 2))
    tokens = model.encode_to_tokens(images)
    assert tokens.shape == (3, 1, 1, 2)
    np.testing.assert_allclose(model.decode_tokens(tokens).numpy(), model(images).numpy(), atol=1e-6)
    config = model.get_config()
    assert (config["stages"], config["normalize_latents"]) == (2, False)
    assert ResidualVQVAE.from_config(config).get_config() == config


def test_unit_latents_are_scaled_to_length_one_first():
    # (3, 4) -> (0.6, 0.8): stage 0 takes (1, 1), leaving (-0.4, -0.2); stage 1 takes
    # (-0.05, 0.1) (distance^2 0.2125 against 0.29).
    model = two_stage_model(normalize_latents=True)
    quantized, indices, _, _ = model.quantize_latents(tf.constant([[[[3.0, 4.0]]]]))
    np.testing.assert_allclose(quantized.numpy().reshape(-1), [0.95, 1.1], atol=1e-6)
    np.testing.assert_array_equal(indices.numpy().reshape(-1), [1, 1])


def test_a_block_of_cells_is_quantized_as_one_vector():
    # block 2 on a 2x2 grid of 1-d latents: the one vector is (top left, top right, bottom left,
    # bottom right) = (0.9, 2.1, 2.9, 4.2), nearest to the code (1, 2, 3, 4), which goes back in place.
    model = ResidualVQVAE(
        stages=1, block=2, embedding_dim=1, num_embeddings=2, encoder_filters=[4], decoder_filters=[4], seed=0
    )
    model.build((None, 4, 4, 3))
    model.quantizer.embeddings.assign([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    quantized, indices, _, _ = model.quantize_latents(tf.constant([[[[0.9], [2.1]], [[2.9], [4.2]]]]))
    np.testing.assert_allclose(quantized.numpy().reshape(2, 2), [[1.0, 2.0], [3.0, 4.0]])
    assert indices.shape == (1, 1, 1, 1) and int(indices[0, 0, 0, 0]) == 1
