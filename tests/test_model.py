"""Models: shapes, serialization round trip in safe mode, token round trip, VAE KL."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY_RUN

from vqvae_class_keras import (
    VQVAE,
    Decoder,
    Encoder,
    ResidualBlock,
    VectorQuantizerEMA,
    _reconstruction_error,
)
from vqvae_faces import model_settings
from vqvae_faces.config import load_config
from vqvae_faces.gaussian_vae import VAE
from vqvae_faces.token_search import search_tokens

# A tiny trunk with the textbook objective (ReLU, plain MSE, no SSIM term, which needs images of 11+ pixels).
TINY = dict(
    encoder_filters=[8, 16],
    decoder_filters=[16, 8],
    num_residual_blocks=1,
    residual_hidden_channels=8,
    activation="relu",
    reconstruction_loss="mse",
    ssim_weight=0.0,
)


def images(n=8, size=16, channels=3, seed=0):
    return np.random.default_rng(seed).random((n, size, size, channels)).astype(np.float32)


def trained(model, x):
    """`model` after one epoch of batches of 4 of `x`, its train step run eagerly (two steps cost less
    than tracing them; the training tests below run the compiled step)."""
    model.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)
    model.build(x.shape)
    model.fit(x, epochs=1, batch_size=4, verbose=0)
    return model


@pytest.fixture(scope="module")
def vqvae():
    """A VQ-VAE trained one epoch on `images(16)`, shared by the tests that only read it (tokens, search)."""
    return trained(VQVAE(image_channels=3, embedding_dim=4, num_embeddings=16, seed=0, **TINY), images(n=16))


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_follow_the_data(channels):
    model = VQVAE(image_channels=channels, embedding_dim=4, num_embeddings=16, **TINY)
    x = images(channels=channels)
    out = model(x)
    assert out.shape == x.shape
    assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 1.0
    assert model.encode_to_tokens(x).shape == (8, 4, 4)


@pytest.mark.parametrize("cls", [VQVAE, VAE])
def test_serialization_round_trip_in_safe_mode(cls, tmp_path):
    x = images()
    extra = dict(embedding_dim=4, num_embeddings=16) if cls is VQVAE else dict(latent_dim=4, kl_beta=0.1)
    model = trained(cls(image_channels=3, seed=1, **TINY, **extra), x)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is cls
    assert loaded.get_config() == model.get_config()
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    if cls is VQVAE:
        np.testing.assert_array_equal(
            loaded.quantizer.ema_cluster_size.numpy(), model.quantizer.ema_cluster_size.numpy()
        )
        assert int(loaded.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy()) == 2


@pytest.mark.parametrize(
    "layer",
    [
        ResidualBlock(8, 4),
        ResidualBlock(8, 4, activation="silu"),
        Encoder([8, 16], 1, 4, 8),
        Encoder([8, 16], 1, 4, 8, activation="gelu"),
        Decoder([16, 8], 1, 3, 8),
        Decoder([16, 8], 3, 3, 8, activation="silu"),
        Decoder([16, 8], 1, 3, 8, output_activation="clip"),
        VectorQuantizerEMA(
            16, 4, commitment_cost=0.3, decay=0.95, epsilon=1e-4, codebook_init="uniform", l2_normalize=True, seed=2
        ),
    ],
)
def test_layer_get_config_round_trip(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config


def test_trunk_options_shape_the_layers():
    model = VQVAE(
        image_channels=3,
        embedding_dim=4,
        num_embeddings=16,
        decoder_residual_blocks=3,
        **{**TINY, "activation": "silu"},
    )
    model.build((None, 16, 16, 3))
    assert len(model.encoder.blocks) == 1 and len(model.decoder.blocks) == 3
    x = np.array([-1.0, 0.5], np.float32)
    block = model.decoder.blocks[0]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(block.act(x)), x / (1 + np.exp(-x)), rtol=1e-6)
    with pytest.raises(ValueError, match="received reconstruction_loss='l1'"):
        VQVAE(image_channels=3, **{**TINY, "reconstruction_loss": "l1"})


def test_clipped_output_is_clipped_forward_and_straight_through_backward():
    decoder = Decoder([16, 8], 1, 3, 8, output_activation="clip")
    latents = tf.constant(np.random.default_rng(0).normal(0.0, 30.0, (2, 4, 4, 4)), tf.float32)
    weights = tf.constant(np.random.default_rng(1).random((2, 16, 16, 3)), tf.float32)
    decoder(latents)
    kernel = decoder.to_image.kernel
    with tf.GradientTape(persistent=True) as tape:
        clipped = decoder(latents)
        raw = decoder.to_image(decoder.features(latents))
        clipped_loss = tf.reduce_sum(weights * clipped)
        raw_loss = tf.reduce_sum(weights * raw)
    raw = raw.numpy()
    assert raw.min() < 0.0 and raw.max() > 1.0  # the test covers pixels clipped on both sides
    np.testing.assert_allclose(clipped.numpy(), np.clip(raw, 0.0, 1.0), atol=1e-6)
    np.testing.assert_allclose(
        tape.gradient(clipped_loss, kernel.value).numpy(), tape.gradient(raw_loss, kernel.value).numpy(), rtol=1e-5
    )
    with pytest.raises(ValueError, match="received output_activation='tanh'"):
        Decoder(output_activation="tanh")


@pytest.mark.parametrize("kind", ["mse", "psnr"])
def test_reconstruction_loss_value_and_gradient(kind):
    # Two 1x1x2 "images": squared errors 0.01 and 0.09 per value, so per-image MSE 0.01 and 0.09.
    x = np.zeros((2, 1, 1, 2), np.float32)
    r = tf.Variable(np.array([0.1, -0.1, 0.3, 0.3], np.float32).reshape(2, 1, 1, 2))
    with tf.GradientTape() as tape:
        loss = _reconstruction_error(x, r, kind, data_variance=None)
    gradient = tape.gradient(loss, r).numpy().reshape(2, 2)
    np.testing.assert_allclose(float(loss), 0.05, rtol=1e-6)  # the mean MSE either way
    difference = r.numpy().reshape(2, 2)
    if kind == "mse":
        expected = 2 * difference / 4  # d/dr of sum(r^2) / 4 values
    else:
        # 0.05 * d/dr of mean_i log(mse_i): image i contributes 0.05 * 2 r / (2 values * 2 images * mse_i).
        expected = 0.05 * 2 * difference / (2 * 2 * np.array([[0.01], [0.09]]))
    np.testing.assert_allclose(gradient, expected, rtol=1e-5)


def test_ssim_term_value_and_gradient():
    """Uniform images a=0.5, b: SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = 0.01^2 (no variance, so no C2 term)."""
    x = np.full((1, 16, 16, 1), 0.5, np.float32)
    b = tf.Variable(0.3)
    with tf.GradientTape() as tape:
        loss = _reconstruction_error(x, tf.fill((1, 16, 16, 1), b), "mse", data_variance=None, ssim_weight=0.5)
    ssim = (2 * 0.5 * 0.3 + 1e-4) / (0.5**2 + 0.3**2 + 1e-4)
    np.testing.assert_allclose(float(loss), 0.2**2 + 0.5 * (1 - ssim), rtol=1e-5)
    # d/db of (a - b)^2 + 0.5 * (1 - SSIM(b)), by hand
    d_ssim = (2 * 0.5 * (0.5**2 + 0.3**2 + 1e-4) - (2 * 0.5 * 0.3 + 1e-4) * 2 * 0.3) / (0.5**2 + 0.3**2 + 1e-4) ** 2
    np.testing.assert_allclose(float(tape.gradient(loss, b)), -2 * 0.2 - 0.5 * d_ssim, rtol=1e-4)


def test_l1_term_value_and_gradient():
    """Errors +0.1 and -0.3 on two pixels: MSE (0.01 + 0.09) / 2, L1 (0.1 + 0.3) / 2, d|e|/dr = sign(r - x) / 2."""
    x = np.array([0.5, 0.5], np.float32).reshape(1, 1, 2, 1)
    r = tf.Variable(np.array([0.6, 0.2], np.float32).reshape(1, 1, 2, 1))
    with tf.GradientTape() as tape:
        loss = _reconstruction_error(x, r, "mse", data_variance=None, l1_weight=0.5)
    np.testing.assert_allclose(float(loss), 0.05 + 0.5 * 0.2, rtol=1e-5)
    expected = 2 * np.array([0.1, -0.3]) / 2 + 0.5 * np.array([1.0, -1.0]) / 2
    np.testing.assert_allclose(tape.gradient(loss, r).numpy().reshape(2), expected, rtol=1e-5)


def test_token_round_trip_equals_reconstruction(vqvae):
    x, model = images(), vqvae
    tokens = model.encode_to_tokens(x)
    assert tokens.dtype == tf.int32
    np.testing.assert_allclose(model.decode_tokens(tokens).numpy(), model(x).numpy(), atol=1e-6)


def test_the_train_step_compiles_with_xla():
    """`jit_compile: true` compiles the whole train step, the quantizer's data sample included."""
    x = images()
    model = VQVAE(image_channels=3, embedding_dim=4, num_embeddings=16, seed=0, **TINY)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
    model.build(x.shape)
    history = model.fit(x, epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert model.jit_compile, "Keras kept XLA on (it turns it off silently for models it cannot compile)"
    # XLA itself compiles the train step: its HLO holds the whole step, the quantizer's sample included.
    step = tf.function(model.train_step, jit_compile=True)
    hlo = step.experimental_get_compiler_ir(tf.constant(x[:4]))(stage="hlo")
    assert "HloModule" in hlo and "sort" in hlo, "the data sample's argsort is part of the compiled step"


def per_image_mse(model, x, tokens):
    return np.mean(np.square(model.decode_tokens(tokens).numpy() - x), axis=(1, 2, 3))


def test_token_search_with_no_steps_gives_the_nearest_codes(vqvae):
    x, model = images(), vqvae
    np.testing.assert_array_equal(search_tokens(model, x, 0, 0.01).numpy(), model.encode_to_tokens(x).numpy())


@pytest.mark.parametrize("compiled", [False, True])
def test_token_search_never_loses_to_the_nearest_codes_and_beats_them_on_average(vqvae, compiled):
    """Each image keeps its best tokens, so its MSE is at most the nearest codes'; moving the
    latents down the decoder's gradient finds better tokens for some images."""
    x, model = images(n=16), vqvae
    search = functools.partial(search_tokens, model)
    search = tf.function(search) if compiled else search
    tokens = search(tf.constant(x), 20, 0.05)
    assert tokens.dtype == tf.int32 and tokens.shape == (16, 4, 4)
    nearest = per_image_mse(model, x, model.encode_to_tokens(x))
    searched = per_image_mse(model, x, tokens)
    assert np.all(searched <= nearest * (1 + 1e-6))
    assert searched.mean() < nearest.mean()


def one_latent_model():
    """A 2x2 grey image, a 1x1 grid, codes e0 = (0.2, 0) and e1 = (1, 0); the encoder always gives
    (0.55, 0), nearer to e0, and the decoder paints every pixel with the first latent channel."""
    model = VQVAE(
        image_channels=1,
        embedding_dim=2,
        num_embeddings=2,
        encoder_filters=[2],
        decoder_filters=[2],
        num_residual_blocks=0,
        residual_hidden_channels=2,
        activation="relu",
        output_activation="clip",
        reconstruction_loss="mse",
        ssim_weight=0.0,
    )
    model.build((1, 2, 2, 1))
    for weight in model.encoder.weights + model.decoder.weights:
        weight.assign(np.zeros(weight.shape, np.float32))
    model.encoder.project.bias.assign([0.55, 0.0])
    mix = np.zeros(model.decoder.mix.kernel.shape, np.float32)
    mix[1, 1, 0, 0] = 1.0
    model.decoder.mix.kernel.assign(mix)
    paint = np.zeros(model.decoder.to_image.kernel.shape, np.float32)
    paint[:, :, 0, 0] = 1.0
    model.decoder.to_image.kernel.assign(paint)
    model.quantizer.embeddings.assign([[0.2, 0.0], [1.0, 0.0]])
    return model


def test_token_search_steps_the_latent_across_to_the_code_the_decoder_prefers():
    """Image 0.9 everywhere: e0 decodes to 0.2 (MSE 0.49), e1 to 1.0 (MSE 0.01). The gradient at e0 is
    (2 (0.2 - 0.9), 0) = (-1.4, 0), RMS-normalised to (-sqrt 2, 0); the codebook's RMS is
    sqrt(1.04 / 4) = 0.5099, so step size 0.02 gives a full step of 0.02 x 0.5099 x sqrt 2 = 0.014422,
    and step i of N moves the latent by 0.014422 x (1 - i / N). Its last evaluation, after N - 1 moves,
    sees 0.55 + 0.014422 x (N - 1 - (N - 1)(N - 2) / 2N): for N = 6, 0.55 + 0.014422 x 3.3333 = 0.5981,
    short of the boundary at 0.6; for N = 7, 0.55 + 0.014422 x 3.8571 = 0.6056, past it. (A step that
    did not shrink would cross with N = 5: 0.55 + 4 x 0.014422 = 0.6077.)"""
    model = one_latent_model()
    x = np.full((1, 2, 2, 1), 0.9, np.float32)
    decoded = model.decode_tokens(np.array([[[0]], [[1]]])).numpy().reshape(2, 4)
    np.testing.assert_allclose(decoded, [[0.2] * 4, [1.0] * 4], rtol=1e-6)
    assert int(model.encode_to_tokens(x)[0, 0, 0]) == 0
    assert int(search_tokens(model, x, 5, 0.02)[0, 0, 0]) == 0
    assert int(search_tokens(model, x, 6, 0.02)[0, 0, 0]) == 0
    assert int(search_tokens(model, x, 7, 0.02)[0, 0, 0]) == 1


def constant_code_lengths(bits):
    """A `code_lengths` function whose code lengths ignore the tokens: bits[k] for code k everywhere."""
    bits = tf.constant(bits, tf.float32)
    return lambda tokens: tf.broadcast_to(bits, (*tokens.shape, len(bits)))


@pytest.mark.parametrize("compiled", [False, True])
def test_the_rate_term_in_the_token_search_moves_the_token_to_the_shorter_code(compiled):
    """The one-latent model with image 0.9 (e0: MSE 0.49, e1: MSE 0.01; the latent 0.55 is 0.35^2 = 0.1225
    from e0, the unit of distance, and 0.45^2 = 0.2025 = 1.653 units from e1). Costs: e0 1 x 0.49 / 0.49
    + lambda b0, e1 0.01 / 0.49 + lambda b1. With b = (1, 0) and lambda 1 the first quantization already
    scores e0 1 + 1 = 2 and e1 1.653: one step gives e1 (cost 0.02 against e0's 2), where the search
    without the rate needs 7 steps. With b = (0, 10), 7 steps keep e0: at 0.6056 the latent is 1.34 units
    from e0 and 1.27 from e1, and e1's 10 bits outweigh that (cost 1 against 10.02)."""
    model = one_latent_model()
    x = tf.constant(np.full((1, 2, 2, 1), 0.9, np.float32))
    search = functools.partial(search_tokens, model)
    search = tf.function(search) if compiled else search
    assert int(search(x, 1, 0.02)[0, 0, 0]) == 0
    assert int(search(x, 1, 0.02, constant_code_lengths([1.0, 0.0]), 1.0)[0, 0, 0]) == 1
    assert int(search(x, 7, 0.02)[0, 0, 0]) == 1
    assert int(search(x, 7, 0.02, constant_code_lengths([0.0, 10.0]), 1.0)[0, 0, 0]) == 0
    assert int(search(x, 7, 0.02, constant_code_lengths([0.0, 10.0]), 0.0)[0, 0, 0]) == 1
    with pytest.raises(ValueError, match="rate_lambda=-1"):
        search_tokens(model, x, 1, 0.02, constant_code_lengths([0.0, 1.0]), -1)


def smooth_images(n, size=16):
    y, x = np.mgrid[0:size, 0:size] / size
    pictures = [
        np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (i + 1) * (x + c * y) / 2) for c in range(3)], axis=-1)
        for i in range(n)
    ]
    return np.stack(pictures).astype(np.float32)


def test_training_reduces_the_loss_and_uses_codes():
    # 30 epochs: over seeds 0-5 the loss falls to 10-25% of its start (15 epochs gave 47-74%, too close to call).
    keras.utils.set_random_seed(0)
    x = np.repeat(smooth_images(4), 8, axis=0)
    model = VQVAE(image_channels=3, embedding_dim=4, num_embeddings=16, seed=0, **TINY)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.build(x.shape)
    history = model.fit(x, epochs=30, batch_size=8, verbose=0).history
    assert history["reconstruction_loss"][-1] < 0.5 * history["reconstruction_loss"][0]
    # over seeds 0-3 the last batch used 11 to 14 of the 16 codes
    assert history["active_code_fraction"][-1] >= 0.5


def test_vae_kl_matches_closed_form():
    x = images(n=4)
    model = VAE(image_channels=3, latent_dim=4, kl_beta=2.0, seed=0, **TINY)
    model.build(x.shape)
    mean, log_variance = [t.numpy().astype(np.float64) for t in model.posterior(x)]
    kl = 0.5 * (mean**2 + np.exp(log_variance) - 1 - log_variance).sum(axis=(1, 2, 3))
    values = model.compute_losses(tf.constant(x), training=False)
    np.testing.assert_allclose(float(values["kl_bits_per_image"]), kl.mean() / np.log(2), rtol=1e-4)
    expected_loss = float(values["reconstruction_loss"]) + 2.0 * kl.mean() / x[0].size
    np.testing.assert_allclose(float(values["loss"]), expected_loss, rtol=1e-4)
    # Inference decodes the posterior mean, not a sample: a decoder fed the mean by hand gives the same
    # faces, and a posterior sample (log-variances of about 0 give noise of about 1) gives other ones.
    np.testing.assert_allclose(model(x).numpy(), model.decoder(tf.constant(mean, tf.float32)).numpy(), atol=1e-6)
    sampled = model.decode_posterior_sample(x, tf.constant([1, 2], tf.int64)).numpy()
    assert np.abs(sampled - model(x).numpy()).max() > 1e-3


def test_vae_latent_samples_have_the_posterior_mean_and_deviation():
    """An independent check of `sample_latents`: over 4,000 seeds, hand-set means (-1, 0, 2.5) and
    deviations (0.1, 1, 3) come back within 4 standard errors."""
    mean = tf.constant([[-1.0, 0.0, 2.5]])
    deviation = np.array([0.1, 1.0, 3.0])
    log_variance = tf.constant(np.log(deviation**2)[None], tf.float32)
    draws = np.concatenate(
        [VAE.sample_latents(mean, log_variance, tf.constant([3, i], tf.int64)).numpy() for i in range(4000)]
    )
    np.testing.assert_array_less(np.abs(draws.mean(axis=0) - [-1.0, 0.0, 2.5]), 4 * deviation / np.sqrt(4000))
    np.testing.assert_allclose(draws.std(axis=0), deviation, rtol=4 / np.sqrt(2 * 4000))
    again = VAE.sample_latents(mean, log_variance, tf.constant([3, 0], tf.int64)).numpy()
    np.testing.assert_array_equal(again, draws[:1])  # a seed always draws the same sample


def test_vae_posterior_sample_decodes_a_sample_of_the_posterior():
    x = images(n=4)
    model = VAE(image_channels=3, latent_dim=4, seed=0, **TINY)
    model.build(x.shape)
    seed = tf.constant([0, 7], tf.int64)
    mean, log_variance = model.posterior(x)
    expected = model.decoder(VAE.sample_latents(mean, log_variance, seed)).numpy()
    sample = model.decode_posterior_sample(tf.constant(x), seed).numpy()
    np.testing.assert_allclose(sample, expected, atol=1e-6)
    other = model.decode_posterior_sample(tf.constant(x), tf.constant([0, 8], tf.int64)).numpy()
    assert np.abs(sample - other).max() > 1e-4, "another seed draws another sample"
    assert np.abs(sample - model(x).numpy()).max() > 1e-4, "differs from decoding the mean"


@pytest.mark.parametrize("clipnorm", [None, 0.5])
def test_gradient_clipnorm_bounds_the_global_norm_adam_sees(clipnorm):
    """Gradients of 3.0 everywhere (global norm 3 sqrt(n)) are scaled to norm 0.5 before
    Adam's first moment takes 1 - beta_1 = 0.1 of them: 0.1 x 0.5 / sqrt(n) per weight."""
    overrides = TINY_RUN + [f"gradient_clipnorm={'null' if clipnorm is None else clipnorm}"]
    model = model_settings.build_model(load_config(None, overrides, ["vqvae"]).runs["vqvae"], 3, None, seed=0)
    model.build((None, 16, 16, 3))
    variables = model.trainable_variables
    n = sum(int(np.prod(v.shape)) for v in variables)
    model.optimizer.apply([np.full(v.shape, 3.0, np.float32) for v in variables], variables)
    momentums = [v.numpy() for v in model.optimizer.variables if v.path.endswith("_momentum")]
    assert len(momentums) == len(variables)
    expected = 0.1 * clipnorm / np.sqrt(n) if clipnorm else 0.3
    for momentum in momentums:
        np.testing.assert_allclose(momentum, expected, rtol=1e-5)


def test_the_token_search_in_evaluate_run_handles_a_partial_last_batch(vqvae, tmp_path):
    """10 faces in batches of 4 (4 + 4 + 2): every face gets the tokens a search of that face alone finds,
    and the saved grids, names and metrics cover all 10."""
    from vqvae_faces.config import VQVAEConfig
    from vqvae_faces.evaluation import TestFaces, evaluate_run
    from vqvae_faces.run_folder import RunPaths

    x, model = smooth_images(10), vqvae
    faces = TestFaces((x * 255).round().astype(np.uint8), np.array([f"p{i}/p{i}_0001.jpg" for i in range(10)]), "ten")
    run = VQVAEConfig(batch_size=4, token_search_steps=5, token_search_step_size=0.05)
    result = evaluate_run("vqvae", run, model, RunPaths.for_run(tmp_path, "vqvae"), faces)
    scaled = faces.images.astype(np.float32) / 255.0
    alone = np.concatenate([search_tokens(model, tf.constant(scaled[i : i + 1]), 5, 0.05).numpy() for i in range(10)])
    np.testing.assert_array_equal(result.tokens, alone)
    saved = np.load(tmp_path / "checkpoints" / "vqvae" / "tokens.npz")
    np.testing.assert_array_equal(saved["tokens"], alone)
    assert list(saved["names"]) == list(faces.names) and result.metrics["num_test_images"] == 10


def test_weight_decay_shrinks_weight_matrices_spares_biases_and_norms_and_survives_a_resume(tmp_path):
    """AdamW with zero gradients moves no weight but decays each matrix by learning_rate x weight_decay;
    biases and layer-norm scales and offsets stay. A loaded model decays alike once the policy is applied."""
    from vqvae_faces.config import PriorRunConfig, TransformerConfig

    run = PriorRunConfig(tokens_from="v", weight_decay=0.5, transformer=TransformerConfig(8, 2, 1, 1))
    model = model_settings.build_model(run, 0, None, 0, learning_rate=0.1, tokens=(4, (2, 2)))
    model(np.zeros((1, 2, 2), np.int32))
    model.save(tmp_path / "prior.keras")
    resumed = model_settings.load_model(tmp_path / "prior.keras")
    run.transformer.dropout = 0.3  # a resumed prior trains on with the dropout its settings say
    model_settings.apply_training_policy(resumed, run, 0.1)
    assert resumed.dropout == resumed.blocks[0].attention_dropout.rate == resumed.blocks[0].residual_dropout.rate == 0.3
    for trained in (model, resumed):
        variables = trained.trainable_variables
        before = [v.numpy() for v in variables]
        trained.optimizer.apply([tf.zeros_like(v) for v in variables], variables)
        spared = [v.name in ("bias", "gamma", "beta") for v in variables]
        assert 0 < sum(spared) < len(variables)
        for variable, old, kept in zip(variables, before, spared):
            np.testing.assert_allclose(variable.numpy(), old if kept else old * (1 - 0.1 * 0.5), rtol=1e-6)


def test_compiled_functions_of_many_models_do_not_warn_of_retracing(caplog):
    """Each model's compiled function traces once; TensorFlow must not count them as one function retracing
    (its "excessive number of tracings" warning, printed to users at every evaluation before)."""
    from vqvae_faces.compiled import compiled

    def scaled(model, x, scale):
        return x * scale

    for index in range(7):
        model = keras.Sequential()  # any object the functions are kept beside
        compiled(model, scaled, scale=float(index))(tf.ones((index + 1, 2)))
    assert "retracing" not in caplog.text
