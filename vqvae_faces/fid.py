"""Fréchet Inception Distance (Heusel et al. 2017) with a Keras InceptionV3 the user provides.

The usual FID packages download their network at run time; this project never does. Point
`sampling.inception_weights` at a Keras InceptionV3 weights file (for example the
ImageNet `inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5` that
`keras.applications.InceptionV3(weights="imagenet", include_top=False)` caches under
~/.keras/models): faces are resized to 299x299, scaled to [-1, 1] and mapped to the
2,048 pooled features, whose Gaussian fits are compared. Scores from this network are
comparable with each other, not with pytorch-fid's (another Inception's weights).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import scipy.linalg
import tensorflow as tf

from vqvae_faces.errors import EvaluationError

INCEPTION_SIZE = 299
FEATURE_BATCH = 32


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


def inception_features(network: keras.Model, images: np.ndarray, batch_size: int = FEATURE_BATCH) -> np.ndarray:
    """Pooled features (N, F) float64 of float images (N, H, W, C) in [0, 1]; grey faces are repeated to RGB."""
    features = []
    for start in range(0, len(images), batch_size):
        batch = tf.convert_to_tensor(images[start : start + batch_size], tf.float32)
        if batch.shape[-1] == 1:
            batch = tf.repeat(batch, 3, axis=-1)
        batch = tf.image.resize(batch, (INCEPTION_SIZE, INCEPTION_SIZE), method="bilinear")
        features.append(network(batch * 2.0 - 1.0, training=False).numpy())
    return np.concatenate(features).astype(np.float64)


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
