"""FID: the Fréchet distance against its closed form, and the feature pipeline with a stand-in network."""

import keras
import numpy as np
import pytest

from vqvae_faces import fid
from vqvae_faces.errors import EvaluationError


def test_frechet_distance_of_independent_gaussians_has_its_closed_form():
    """Diagonal covariances: ||mu_a - mu_b||^2 + sum (s_a + s_b - 2 sqrt(s_a s_b))."""
    rng = np.random.default_rng(0)
    a = rng.normal([0.0, 1.0, 2.0], [1.0, 2.0, 0.5], size=(200_000, 3))
    b = rng.normal([1.0, 1.0, 0.0], [3.0, 1.0, 0.5], size=(200_000, 3))
    variance_a, variance_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = 1.0 + 0.0 + 4.0 + (variance_a + variance_b - 2 * np.sqrt(variance_a * variance_b)).sum()
    assert fid.frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert fid.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_features_are_taken_at_299_pixels_in_minus_one_to_one_with_grey_faces_as_rgb():
    seen = []

    def network(images, training):  # stands in for InceptionV3(pooling="avg"): one feature per channel
        assert training is False
        seen.append(np.asarray(images))
        return keras.ops.mean(images, axis=(1, 2))

    grey = np.full((5, 16, 16, 1), 0.75, np.float32)
    features = fid.inception_features(network, grey, batch_size=2)
    assert features.shape == (5, 3) and features.dtype == np.float64
    np.testing.assert_allclose(features, 0.5, atol=1e-6)  # 0.75 in [0, 1] is 0.5 in [-1, 1]
    assert [batch.shape for batch in seen] == [(2, 299, 299, 3), (2, 299, 299, 3), (1, 299, 299, 3)]


def test_missing_inception_weights_are_a_clear_error(tmp_path):
    with pytest.raises(EvaluationError, match="does not exist"):
        fid.inception_network(tmp_path / "none.h5")
