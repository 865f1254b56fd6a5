"""The coarse-to-fine grid of experiments/PRIOR.md (coarse_to_fine.py): packing, decoding, causality, sampling."""

import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from coarse_to_fine import ConditionedTransformer, TwoLevelVQVAE, pack, unpack  # noqa: E402

from vqvae_faces.token_prior import choose_by_uniform, position_uniforms  # noqa: E402


def tiny_prior():
    prior = ConditionedTransformer(16, (4, 4), top_num_embeddings=8, width=16, num_heads=2, num_layers=2)
    prior.build(None)
    return prior


def random_grids(count, seed):
    rng = np.random.default_rng(seed)
    return pack(rng.integers(0, 8, (count, 2, 2)), rng.integers(0, 16, (count, 4, 4))).numpy()


def test_pack_repeats_each_top_token_over_its_2x2_block_and_unpack_inverts_it():
    top = np.array([[[1, 2], [3, 4]]])
    bottom = np.arange(16).reshape(1, 4, 4)
    grids = pack(top, bottom).numpy()
    np.testing.assert_array_equal(grids[0, :, :, 1], [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
    np.testing.assert_array_equal(grids[..., 0], bottom)
    top_back, bottom_back = unpack(grids)
    np.testing.assert_array_equal(top_back, top)
    np.testing.assert_array_equal(bottom_back, bottom)


@pytest.mark.parametrize("compiled", [False, True])
def test_tokens_of_both_levels_decode_to_the_model_output(compiled):
    model = TwoLevelVQVAE(
        top_num_embeddings=8,
        top_channels=8,
        num_embeddings=16,
        encoder_filters=[8, 8],
        decoder_filters=[8, 8],
        num_residual_blocks=1,
        seed=0,
    )
    model.build((None, 16, 16, 3))
    images = tf.random.stateless_uniform((3, 16, 16, 3), seed=(1, 2))
    model.compute_losses(images, training=True)  # the codebooks from the data, as in training
    encode = tf.function(model.encode_to_tokens) if compiled else model.encode_to_tokens
    tokens = encode(images).numpy()
    assert tokens.shape == (3, 4, 4, 2)
    assert (tokens[:, ::2, ::2, 1] == tokens[:, 1::2, 1::2, 1]).all()
    np.testing.assert_allclose(model.decode_tokens(tokens).numpy(), model(images).numpy(), atol=1e-6)
    changed = tokens.copy()
    changed[0, 0, 0, 1] = changed[0, 0, 1, 1] = changed[0, 1, 0, 1] = changed[0, 1, 1, 1] = (tokens[0, 0, 0, 1] + 1) % 8
    assert np.abs(model.decode_tokens(changed).numpy() - model.decode_tokens(tokens).numpy()).max() > 0
    assert model.get_config()["top_num_embeddings"] == 8


def test_a_bottom_position_sees_the_bottom_tokens_before_it_and_the_whole_top_grid():
    prior = tiny_prior()
    grids = random_grids(1, 0)
    logits = prior(grids).numpy()
    for position in range(16):
        row, column = divmod(position, 4)
        changed = grids.copy()
        changed[0, row, column, 0] = (changed[0, row, column, 0] + 1) % 16
        moved = np.abs(prior(changed).numpy() - logits).max(axis=-1).reshape(-1)
        assert (moved[: position + 1] == 0).all() and (moved[position + 1 :] > 0).all(), position
    changed = grids.copy()
    changed[0, 2:, 2:, 1] = (changed[0, 2:, 2:, 1] + 1) % 8  # the last top token: even the first position sees it
    assert (np.abs(prior(changed).numpy() - logits).max(axis=-1) > 0).all()


def test_the_cached_sampler_draws_what_full_passes_draw_from_the_same_uniforms():
    prior = tiny_prior()
    top = random_grids(5, 1)[:, ::2, ::2, 1]
    seed = tf.constant([3, 4], tf.int64)
    drawn = prior.sample_bottom(top, seed).numpy()
    grids = pack(top, np.zeros((5, 4, 4), np.int32)).numpy()
    for position in range(16):
        row, column = divmod(position, 4)
        logits = prior(grids).numpy()[:, row, column]
        grids[:, row, column, 0] = choose_by_uniform(logits, position_uniforms(seed, position, 5)).numpy()
    np.testing.assert_array_equal(drawn, grids[..., 0])
    assert len(np.unique(drawn)) > 1


def test_the_conditioned_prior_survives_a_safe_mode_round_trip(tmp_path):
    prior = tiny_prior()
    grids = random_grids(2, 2)
    prior.save(tmp_path / "prior.keras")
    loaded = keras.saving.load_model(tmp_path / "prior.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.token_log_probs(grids).numpy(), prior.token_log_probs(grids).numpy(), atol=1e-6)
