"""The token priors: causality by construction, exact log-likelihoods, cached sampling, seeds, saving."""

import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf
from conftest import token_log_probs

from vqvae_faces.prior_stream import FloatStream
from vqvae_faces.token_prior import (
    CACHE_CHUNK,
    CausalTransformer,
    GatedPixelCNN,
    TokenPrior,
    choose_by_uniform,
    choose_tokens,
)

K, GRID = 7, (4, 5)


def tiny(architecture):
    keras.utils.set_random_seed(0)
    if architecture == "pixelcnn":
        model = GatedPixelCNN(K, GRID, channels=8, num_layers=3)
    else:
        model = CausalTransformer(K, GRID, width=16, num_heads=2, num_layers=2, mlp_ratio=2)
    model(np.zeros((1, *GRID), np.int32))
    return model


def grids(count, seed=0):
    return np.random.default_rng(seed).integers(0, K, (count, *GRID)).astype(np.int32)


@pytest.mark.parametrize("architecture", ["pixelcnn", "transformer"])
def test_changing_a_token_never_changes_the_prediction_at_or_before_it(architecture):
    model = tiny(architecture)
    base = grids(1)
    logits = model(base).numpy().reshape(-1, K)
    later_changed = 0
    for position in range(GRID[0] * GRID[1]):
        changed = base.copy()
        row, column = divmod(position, GRID[1])
        changed[0, row, column] = (changed[0, row, column] + 3) % K
        new = model(changed).numpy().reshape(-1, K)
        np.testing.assert_array_equal(new[: position + 1], logits[: position + 1], err_msg=f"position {position}")
        later_changed += int(np.abs(new[position + 1 :] - logits[position + 1 :]).max(initial=0) > 1e-6)
    # the check can fail: later predictions do depend on the token (all but the last position's)
    assert later_changed >= GRID[0] * GRID[1] - 2


@pytest.mark.parametrize("architecture", ["pixelcnn", "transformer"])
def test_log_likelihood_of_hand_set_weights(architecture):
    """All weights zero but the output bias b: every position predicts softmax(b), so
    log p(grid) = sum over tokens of log softmax(b)[t], computed here by hand."""
    model = tiny(architecture)
    for weight in model.weights:
        weight.assign(keras.ops.zeros(weight.shape, weight.dtype))
    bias = np.array([2.0, 0.0, -1.0, 0.5, 0.0, 1.0, -2.0])
    model.head.bias.assign(bias)
    log_softmax = bias - np.log(np.exp(bias).sum())
    tokens = grids(3, seed=4)
    expected = log_softmax[tokens].sum(axis=(1, 2))
    np.testing.assert_allclose(model.log_likelihood(tokens).numpy(), expected, rtol=1e-5)
    # 20 tokens of grid 0 by hand: count of each token times its log-probability
    counts = np.bincount(tokens[0].ravel(), minlength=K)
    assert model.log_likelihood(tokens[:1]).numpy()[0] == pytest.approx((counts * log_softmax).sum(), rel=1e-5)


@pytest.mark.parametrize("architecture", ["pixelcnn", "transformer"])
def test_log_likelihood_sums_the_conditionals(architecture):
    model = tiny(architecture)
    tokens = grids(2, seed=1)
    expected = token_log_probs(model(tokens), tokens).sum(axis=(1, 2))
    np.testing.assert_allclose(model.log_likelihood(tokens).numpy(), expected, rtol=1e-5)


def test_cached_sampling_equals_full_passes():
    model = tiny("transformer")
    for seed in range(3):
        seed = tf.constant([11, seed], tf.int64)
        cached = model.sample_tokens(4, seed, temperature=1.3).numpy()
        full = TokenPrior.sample_tokens(model, 4, seed, temperature=1.3).numpy()  # a full pass per token
        np.testing.assert_array_equal(cached, full)


def test_the_stream_spans_several_cache_chunks_and_a_chunk_per_call_equals_a_position_per_call():
    """Format 1's float program over a 9x10 grid (a full cache chunk of keys and values and a partial one): the
    encoder's call per chunk (`known`) and the decoder's call per position (`run`) give identical
    distributions, equal to the softmax of the full pass; `run` hands each position the tokens chosen
    before it. Cached sampling still equals full-pass sampling."""
    grid = (9, 10)
    assert CACHE_CHUNK < grid[0] * grid[1] < 2 * CACHE_CHUNK
    keras.utils.set_random_seed(1)
    model = CausalTransformer(K, grid, width=16, num_heads=2, num_layers=2, mlp_ratio=2)
    assert [length for _, length in model.cache_chunks()] == [CACHE_CHUNK, grid[0] * grid[1] - CACHE_CHUNK]
    tokens = np.random.default_rng(2).integers(0, K, (3, grid[0] * grid[1]))
    full = tf.nn.softmax(model(tokens.reshape(3, *grid))).numpy().reshape(3, -1, K)
    stream = FloatStream(model, 3)
    at_once = stream.known(tokens)
    np.testing.assert_allclose(at_once, full, atol=1e-5)
    seen = []

    def choose(position, probabilities):
        seen.append(probabilities)
        return tokens[:, position]

    chosen, one_by_one = stream.run(choose, 3)
    np.testing.assert_array_equal(chosen, tokens)
    np.testing.assert_array_equal(one_by_one, at_once)
    np.testing.assert_array_equal(np.stack(seen, axis=1), at_once)
    seed = tf.constant([4, 5], tf.int64)
    np.testing.assert_array_equal(
        model.sample_tokens(2, seed).numpy(), TokenPrior.sample_tokens(model, 2, seed).numpy()
    )


@pytest.mark.parametrize("architecture", ["pixelcnn", "transformer"])
def test_seeded_sampling_is_reproducible(architecture):
    model = tiny(architecture)
    first = model.sample_tokens(3, tf.constant([1, 2], tf.int64)).numpy()
    again = model.sample_tokens(3, tf.constant([1, 2], tf.int64)).numpy()
    other = model.sample_tokens(3, tf.constant([1, 3], tf.int64)).numpy()
    np.testing.assert_array_equal(first, again)
    assert first.shape == (3, *GRID) and first.dtype == np.int32 and (first != other).any()
    assert first.min() >= 0 and first.max() < K


def test_top_k_and_top_p_restrict_the_draws():
    logits = tf.math.log(tf.constant([[0.5, 0.3, 0.15, 0.05]] * 2000))
    draws = [choose_tokens(logits, tf.constant([5, i], tf.int64), top_k=2).numpy() for i in range(3)]
    assert set(np.concatenate(draws)) == {0, 1}
    nucleus = choose_tokens(logits, tf.constant([6, 0], tf.int64), top_p=0.7).numpy()
    assert set(nucleus) == {0, 1}, "0.5 + 0.3 reach 0.7: the nucleus is the first two tokens"
    greedy = choose_tokens(logits, tf.constant([7, 0], tf.int64), top_p=0.1).numpy()
    assert set(greedy) == {0}
    many = tf.math.log(tf.constant([[0.5, 0.3, 0.15, 0.05]] * 20000))
    plain = choose_tokens(many, tf.constant([8, 0], tf.int64)).numpy()
    assert_follows(plain, [0.5, 0.3, 0.15, 0.05])
    cold = choose_tokens(logits, tf.constant([9, 0], tf.int64), temperature=0.05).numpy()
    assert (cold == 0).mean() > 0.99
    with pytest.raises(ValueError, match="received temperature=0"):
        choose_tokens(logits, tf.constant([9, 0], tf.int64), temperature=0)


def assert_follows(draws, probabilities):
    """Pearson's chi-square test of `draws` (ints) against `probabilities`, at the 0.1% level. The
    draws come from fixed seeds, so the outcome is the same on every run; a sampler off by a few
    percent of a probability fails it with these counts."""
    probabilities = np.asarray(probabilities, np.float64)
    observed = np.bincount(np.ravel(draws), minlength=len(probabilities))
    assert not observed[probabilities == 0].any(), f"a token of probability 0 was drawn: {observed}"
    support = probabilities > 0
    expected = probabilities[support] / probabilities.sum() * observed.sum()
    result = scipy.stats.chisquare(observed[support], expected)
    assert result.pvalue > 1e-3, (observed, expected.round(1), result)


def hand_set_prior(probabilities):
    """The tiny transformer with its output layer set by hand: logits log(probabilities) at every
    position, whatever the tokens before it."""
    model = tiny("transformer")
    model.head.kernel.assign(np.zeros(model.head.kernel.shape, np.float32))
    model.head.bias.assign(np.log(np.asarray(probabilities, np.float32)))
    return model


P = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.04, 0.01])


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({}, P),
        ({"temperature": 2.0}, P**0.5),
        ({"temperature": 0.5}, P**2),
        ({"top_k": 3}, np.where(np.arange(K) < 3, P, 0)),
        ({"top_p": 0.7}, np.where(np.arange(K) < 3, P, 0)),  # 0.4 + 0.25 < 0.7: the third token is needed
        ({"top_p": 0.65}, np.where(np.arange(K) < 2, P, 0)),  # 0.4 + 0.25 reach 0.65
        ({"temperature": 2.0, "top_k": 4}, np.where(np.arange(K) < 4, P**0.5, 0)),
    ],
)
def test_samples_follow_the_prior_s_distribution(settings, expected):
    """The cached sampler users run (the full-pass one draws the same grids: test_cached_sampling_...)."""
    draws = hand_set_prior(P).sample_tokens(600, tf.constant([3, 4], tf.int64), **settings).numpy()
    assert_follows(draws, expected)  # 12,000 draws


def test_a_uniform_draw_picks_the_first_token_whose_cumulative_probability_reaches_it():
    """Probabilities 0.5, 0.3, 0.15, 0.05: cumulative 0.5, 0.8, 0.95, 1."""
    logits = tf.math.log(tf.constant([[0.5, 0.3, 0.15, 0.05]] * 7))
    uniforms = tf.constant([1e-7, 0.49, 0.51, 0.79, 0.81, 0.96, 1.0])
    np.testing.assert_array_equal(choose_by_uniform(logits, uniforms).numpy(), [0, 0, 1, 1, 2, 3, 3])
    # top_k=2 leaves 0.5 / 0.8 and 0.3 / 0.8: cumulative 0.625, 1
    np.testing.assert_array_equal(choose_by_uniform(logits, uniforms, top_k=2).numpy(), [0, 0, 0, 1, 1, 1, 1])
    # temperature 2 makes them proportional to the square roots: cumulative 0.379, 0.673, 0.880, 1
    np.testing.assert_array_equal(choose_by_uniform(logits, uniforms, temperature=2.0).numpy(), [0, 1, 1, 2, 2, 3, 3])


@pytest.mark.parametrize("architecture", ["pixelcnn", "transformer"])
def test_save_and_load_in_safe_mode(architecture, tmp_path):
    model = tiny(architecture)
    model.compile(optimizer="adam")
    path = tmp_path / "prior.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    tokens = grids(2)
    np.testing.assert_allclose(loaded(tokens).numpy(), model(tokens).numpy(), atol=1e-6)
    assert loaded.get_config()["grid_size"] == list(GRID)


def test_the_pixelcnn_learns_a_deterministic_pattern():
    """Grids whose tokens count up along the raster order from a random start: after the first token
    everything is determined, so the NLL must fall far below the unigram entropy of log2(7) = 2.81 bits."""
    rng = np.random.default_rng(0)
    starts = rng.integers(0, K, 256)
    data = ((starts[:, None] + np.arange(20)[None]) % K).reshape(256, *GRID).astype(np.int32)
    model = tiny("pixelcnn")
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(data, batch_size=32, epochs=15, verbose=0).history
    assert history["bits_per_token"][-1] < 0.5
    assert history["bits_per_token"][-1] < 0.25 * history["bits_per_token"][0]


@pytest.mark.parametrize("architecture", ["pixelcnn", "transformer"])
def test_a_loss_scale_optimizer_makes_the_same_step_as_its_inner_optimizer(architecture):
    """Under mixed_float16 the optimizer is a LossScaleOptimizer: the step must scale the loss it
    differentiates, or the unscaled gradients would move the weights 2**15 times too little."""
    tokens = grids(8)
    steps = []
    for optimizer in (keras.optimizers.SGD(0.5), keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.5))):
        model = tiny(architecture)
        model.compile(optimizer=optimizer)
        before = [w.numpy() for w in model.trainable_weights]
        model.fit(tokens, batch_size=len(tokens), epochs=1, verbose=0)
        steps.append([w.numpy() - b for w, b in zip(model.trainable_weights, before)])
    assert max(np.abs(step).max() for step in steps[0]) > 1e-3, "the plain step moves the weights"
    for plain, scaled in zip(*steps):
        np.testing.assert_allclose(scaled, plain, rtol=1e-4, atol=1e-6)


def test_dropout_acts_in_training_only_and_the_codec_s_program_ignores_it():
    keras.utils.set_random_seed(3)
    model = CausalTransformer(K, GRID, width=16, num_heads=2, num_layers=2, mlp_ratio=2, dropout=0.5)
    tokens = grids(4)
    inference = model(tokens).numpy()
    np.testing.assert_array_equal(model(tokens).numpy(), inference)
    assert np.abs(model(tokens, training=True).numpy() - inference).max() > 0.1
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # weights stay as they are
    trained = model.train_on_batch(tokens, return_dict=True)["loss"]
    tested = model.test_on_batch(tokens, return_dict=True)["loss"]
    assert abs(trained - tested) > 1e-3  # the train step drops, the test step does not
    np.testing.assert_allclose(model.evaluate(tokens, verbose=0, return_dict=True)["loss"], tested, rtol=1e-6)
    known = FloatStream(model, 4).known(tokens.reshape(4, -1))
    np.testing.assert_allclose(known, tf.nn.softmax(inference).numpy().reshape(4, -1, K), atol=1e-5)
    assert CausalTransformer.from_config(model.get_config()).dropout == 0.5
