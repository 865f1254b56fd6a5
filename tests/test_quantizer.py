"""VectorQuantizerEMA against hand-made tensors and a NumPy oracle, eager and compiled."""

import numpy as np
import pytest
import tensorflow as tf

from vqvae_class_keras import VectorQuantizerEMA

MODES = ["eager", "tf.function"]


def make_quantizer(codebook, decay=0.9, epsilon=1e-5, commitment_cost=0.25, init="uniform"):
    k, d = codebook.shape
    layer = VectorQuantizerEMA(k, d, commitment_cost=commitment_cost, decay=decay, epsilon=epsilon, codebook_init=init)
    layer.build((None, d))
    layer.embeddings.assign(codebook)
    layer.ema_embedding_sum.assign(codebook)
    return layer


def call(layer, inputs, training, mode):
    fn = (
        (lambda x: layer(x, training=training))
        if mode == "eager"
        else tf.function(lambda x: layer(x, training=training))
    )
    return {k: v.numpy() for k, v in fn(tf.constant(inputs)).items()}


CODEBOOK = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], np.float32)
# Nearest codes by hand: (0.1, 0.1)->0, (0.9,-0.2)->1, (0.2,1.5)->2, (0.6,0.1)->1, (-1,-1)->0
INPUTS = np.array([[[0.1, 0.1], [0.9, -0.2]], [[0.2, 1.5], [0.6, 0.1]], [[-1.0, -1.0], [0.45, 0.0]]], np.float32)
EXPECTED = np.array([[0, 1], [2, 1], [0, 0]])


def numpy_ema_oracle(codebook, cluster, sums, flat, indices, decay, epsilon):
    k = len(codebook)
    counts = np.bincount(indices, minlength=k).astype(np.float64)
    dw = np.zeros_like(codebook, dtype=np.float64)
    for vector, index in zip(flat, indices):
        dw[index] += vector
    cluster = decay * cluster + (1 - decay) * counts
    sums = decay * sums + (1 - decay) * dw
    n = cluster.sum()
    smoothed = (cluster + epsilon) / (n + k * epsilon) * n
    return cluster, sums, sums / smoothed[:, None]


@pytest.mark.parametrize("mode", MODES)
def test_nearest_code_by_squared_distance(mode):
    layer = make_quantizer(CODEBOOK)
    out = call(layer, INPUTS, training=False, mode=mode)
    np.testing.assert_array_equal(out["indices"], EXPECTED)
    np.testing.assert_allclose(out["quantized"], CODEBOOK[EXPECTED], atol=1e-6)
    np.testing.assert_array_equal(layer.encode_indices(tf.constant(INPUTS)).numpy(), EXPECTED)
    np.testing.assert_allclose(layer.lookup(EXPECTED).numpy(), CODEBOOK[EXPECTED])


@pytest.mark.parametrize("mode", MODES)
def test_losses_and_diagnostics_by_hand(mode):
    layer = make_quantizer(CODEBOOK, commitment_cost=0.5)
    out = call(layer, INPUTS, training=False, mode=mode)
    squared = ((INPUTS - CODEBOOK[EXPECTED]) ** 2).mean()
    np.testing.assert_allclose(out["commitment_loss"], 0.5 * squared, rtol=1e-5)
    p = np.array([3, 2, 1]) / 6
    np.testing.assert_allclose(out["perplexity"], np.exp(-(p * np.log(p)).sum()), rtol=1e-5)
    np.testing.assert_allclose(out["active_fraction"], 1.0)


@pytest.mark.parametrize("mode", MODES)
def test_ema_update_matches_numpy_oracle_over_steps(mode):
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=(5, 3)).astype(np.float32)
    layer = make_quantizer(codebook, decay=0.8, epsilon=1e-3)
    cluster, sums = np.ones(5), codebook.astype(np.float64)
    step = (lambda x: layer(x, training=True)) if mode == "eager" else tf.function(lambda x: layer(x, training=True))
    for _ in range(3):
        batch = rng.normal(size=(4, 6, 3)).astype(np.float32)
        current = layer.embeddings.numpy().astype(np.float64)
        flat = batch.reshape(-1, 3)
        indices = ((flat[:, None, :] - current[None]) ** 2).sum(-1).argmin(1)
        out = step(tf.constant(batch))
        np.testing.assert_array_equal(out["indices"].numpy().reshape(-1), indices)
        cluster, sums, expected = numpy_ema_oracle(current, cluster, sums, flat, indices, 0.8, 1e-3)
        np.testing.assert_allclose(layer.ema_cluster_size.numpy(), cluster, rtol=1e-5)
        np.testing.assert_allclose(layer.ema_embedding_sum.numpy(), sums, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.embeddings.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_single_step_ema_by_hand():
    """decay 0.5, epsilon 0, counts start at 1: code 1 gets (0.9, -0.2) and (0.6, 0.1)."""
    layer = make_quantizer(CODEBOOK, decay=0.5, epsilon=0.0)
    layer(tf.constant(INPUTS), training=True)
    np.testing.assert_allclose(layer.ema_cluster_size.numpy(), [0.5 + 1.5, 0.5 + 1.0, 0.5 + 0.5])
    np.testing.assert_allclose(layer.ema_embedding_sum.numpy()[1], [0.5 + 0.75, -0.05], rtol=1e-6)
    np.testing.assert_allclose(layer.embeddings.numpy()[1], [1.25 / 1.5, -0.05 / 1.5], rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_l2_normalized_codes_by_hand(mode):
    """Unit codes (1, 0), (0, 1); inputs (2, 0) and (3, 4) become (1, 0) and (0.6, 0.8): codes 0 and 1.
    decay 0.5, epsilon 0: code 1's EMA sum is 0.5 (0, 1) + 0.5 (0.6, 0.8) = (0.3, 0.9), count 1, and
    the new code is that sum scaled to length 1."""
    layer = VectorQuantizerEMA(
        2, 2, commitment_cost=0.25, decay=0.5, epsilon=0.0, codebook_init="uniform", l2_normalize=True
    )
    layer.build((None, 2))
    np.testing.assert_allclose(np.linalg.norm(layer.embeddings.numpy(), axis=1), 1.0, rtol=1e-6)
    layer.embeddings.assign([[1.0, 0.0], [0.0, 1.0]])
    layer.ema_embedding_sum.assign([[1.0, 0.0], [0.0, 1.0]])
    out = call(layer, np.array([[2.0, 0.0], [3.0, 4.0]], np.float32), training=True, mode=mode)
    np.testing.assert_array_equal(out["indices"], [0, 1])
    np.testing.assert_allclose(out["quantized"], [[1.0, 0.0], [0.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(out["commitment_loss"], 0.25 * (0.6**2 + 0.2**2) / 4, rtol=1e-5)
    np.testing.assert_allclose(layer.ema_embedding_sum.numpy(), [[1.0, 0.0], [0.3, 0.9]], rtol=1e-6)
    np.testing.assert_allclose(layer.embeddings.numpy()[1], np.array([0.3, 0.9]) / np.hypot(0.3, 0.9), rtol=1e-6)
    # A long input pointing at code 1 gets code 1 itself, of length 1.
    np.testing.assert_allclose(
        layer.lookup(layer.encode_indices(tf.constant([[0.0, 10.0]]))).numpy(), layer.embeddings.numpy()[1:], rtol=1e-6
    )


@pytest.mark.parametrize("mode", MODES)
def test_weights_frozen_in_inference(mode):
    layer = make_quantizer(CODEBOOK)
    before = [w.numpy().copy() for w in layer.weights]
    call(layer, INPUTS, training=False, mode=mode)
    for old, new in zip(before, layer.weights):
        np.testing.assert_array_equal(old, new.numpy())
    assert not layer.trainable_weights


@pytest.mark.parametrize("mode", MODES)
def test_straight_through_gradient_is_identity(mode):
    layer = make_quantizer(CODEBOOK, commitment_cost=0.0)
    inputs = tf.constant(INPUTS)
    upstream = tf.constant(np.random.default_rng(1).normal(size=INPUTS.shape).astype(np.float32))

    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=False)["quantized"] * upstream)
        return tape.gradient(loss, x)

    fn = gradient if mode == "eager" else tf.function(gradient)
    np.testing.assert_allclose(fn(inputs).numpy(), upstream.numpy(), rtol=1e-6)


def test_commitment_gradient_pulls_inputs_to_codes():
    layer = make_quantizer(CODEBOOK, commitment_cost=1.0)
    inputs = tf.constant(INPUTS)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        loss = layer(inputs, training=False)["commitment_loss"]
    expected = 2.0 * (INPUTS - CODEBOOK[EXPECTED]) / INPUTS.size
    np.testing.assert_allclose(tape.gradient(loss, inputs).numpy(), expected, rtol=1e-5)


def test_data_initialisation_uses_encoder_outputs_once():
    layer = VectorQuantizerEMA(4, 2, decay=0.999, codebook_init="data", seed=3)
    batch = np.arange(16, dtype=np.float32).reshape(8, 2) * 10.0
    layer(tf.constant(batch), training=True)
    assert layer.initialized.numpy() == 1.0
    codes = layer.embeddings.numpy()
    distance_to_data = np.sqrt(((codes[:, None] - batch[None]) ** 2).sum(-1)).min(axis=1)
    assert np.all(distance_to_data < 0.5), "each code starts on a distinct encoder output"
    assert len({tuple(np.round(c)) for c in codes}) == 4
    np.testing.assert_allclose(layer.ema_cluster_size.numpy().sum(), 0.999 * 4 + 0.001 * 8, rtol=1e-5)
    layer(tf.constant(batch + 1000.0), training=True)
    assert np.all(np.abs(layer.embeddings.numpy() - codes) < 10.0), "initialisation happens only once"


def test_reset_codes_gives_consistent_fresh_state():
    layer = make_quantizer(CODEBOOK)
    layer.ema_cluster_size.assign([4.0, 0.1, 1.9])
    layer.reset_codes([1], [[5.0, 5.0]])
    np.testing.assert_allclose(layer.embeddings.numpy()[1], [5.0, 5.0])
    np.testing.assert_allclose(layer.ema_cluster_size.numpy(), [4.0, 2.0, 1.9])
    np.testing.assert_allclose(layer.ema_embedding_sum.numpy()[1], [10.0, 10.0])


def test_invalid_arguments_echo_the_value():
    with pytest.raises(ValueError, match="num_embeddings=1"):
        VectorQuantizerEMA(1, 4)
    with pytest.raises(ValueError, match="decay=1.5"):
        VectorQuantizerEMA(8, 4, decay=1.5)
    with pytest.raises(ValueError, match="last axis 3"):
        VectorQuantizerEMA(8, 4).build((None, 3))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [512, 2048, 2048 + 37])
def test_nearest_codes_over_several_chunks_match_numpy(mode, rows):
    """Production batches are 2,048 rows (four 512-row chunks); a ragged count pads the last chunk."""
    rng = np.random.default_rng(rows)
    codebook = rng.normal(size=(512, 16)).astype(np.float32)
    flat = rng.normal(size=(rows, 16)).astype(np.float32)
    layer = make_quantizer(codebook)
    nearest = layer.nearest_codes if mode == "eager" else tf.function(layer.nearest_codes)
    found = nearest(tf.constant(flat)).numpy()
    distances = ((flat[:, None, :].astype(np.float64) - codebook[None].astype(np.float64)) ** 2).sum(-1)
    expected = distances.argmin(axis=1)
    assert found.shape == (rows,) and found.dtype == np.int32
    # float32 scores may break a near-tie the other way; then both codes must be equally near
    differ = found != expected
    assert differ.mean() < 0.002
    np.testing.assert_allclose(distances[differ, found[differ]], distances[differ, expected[differ]], rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_entropy_constrained_assignment_by_hand_and_over_steps(mode):
    """rate_lambda > 0: argmin |z - e_k|^2 + rate_lambda * u * (-log2 share of code k), u the EMA of the mean
    squared distance to the nearest codes (the first batch sets it), against NumPy over three training steps."""
    layer = VectorQuantizerEMA(3, 2, decay=0.5, epsilon=0.0, codebook_init="uniform", rate_lambda=1.0)
    layer.build((None, 2))
    layer.embeddings.assign(CODEBOOK)
    layer.ema_embedding_sum.assign(CODEBOOK)
    layer.ema_cluster_size.assign([6.0, 1.0, 1.0])  # shares 3/4, 1/8, 1/8: 0.415, 3 and 3 bits
    layer.rate_unit.assign(0.1)
    # (0.6, 0.1): 0.37 + 0.0415 for code 0 against 0.17 + 0.3 for code 1, so code 0 (the nearest is 1);
    # (0.9, -0.2): 0.85 + 0.0415 against 0.05 + 0.3: code 1 still
    found = layer.encode_indices(tf.constant([[0.6, 0.1], [0.9, -0.2]], tf.float32)).numpy()
    np.testing.assert_array_equal(found, [0, 1])
    rng = np.random.default_rng(1)
    step = (lambda x: layer(x, training=True)) if mode == "eager" else tf.function(lambda x: layer(x, training=True))
    cluster, sums, unit = np.array([6.0, 1.0, 1.0]), CODEBOOK.astype(np.float64), 0.1
    for _ in range(3):
        flat = rng.normal(0.5, 0.8, size=(12, 2)).astype(np.float32)
        codes = layer.embeddings.numpy().astype(np.float64)
        lengths = -np.log2(cluster / cluster.sum())
        costs = ((flat[:, None, :] - codes[None]) ** 2).sum(-1) + 1.0 * unit * lengths
        indices = costs.argmin(1)
        out = step(tf.constant(flat))
        np.testing.assert_array_equal(out["indices"].numpy(), indices)
        unit = 0.5 * unit + 0.5 * ((flat[:, None, :] - codes[None]) ** 2).sum(-1).min(1).mean()
        cluster, sums, _ = numpy_ema_oracle(codes, cluster, sums, flat, indices, 0.5, 0.0)
        np.testing.assert_allclose(layer.rate_unit.numpy(), unit, rtol=1e-5)
        np.testing.assert_allclose(layer.ema_cluster_size.numpy(), cluster, rtol=1e-5)


def test_the_rate_term_is_off_by_default_and_its_state_exists_only_with_it():
    plain, rated = VectorQuantizerEMA(8, 4), VectorQuantizerEMA(8, 4, codebook_init="uniform", rate_lambda=0.5)
    plain.build((None, 4))
    rated.build((None, 4))
    assert len(rated.non_trainable_weights) == len(plain.non_trainable_weights) + 1 and not hasattr(plain, "rate_unit")
    assert VectorQuantizerEMA.from_config(rated.get_config()).rate_lambda == 0.5
    unit = rated.rate_unit.numpy()
    rated(tf.random.normal((4, 4)), training=True)
    assert unit == 0 and rated.rate_unit.numpy() > 0  # the first batch sets it
    with pytest.raises(ValueError, match="rate_lambda=-1"):
        VectorQuantizerEMA(8, 4, rate_lambda=-1)
