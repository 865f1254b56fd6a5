"""What a token prior is judged by: its code length on held-out faces, and whether its samples copy.

Pure NumPy on arrays the evaluation hands in, so each figure can be checked by hand.
"""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_SAMPLES = 2000
DISTANCE_CHUNK = 256


def code_length_summary(log_likelihoods: np.ndarray, tokens_per_grid: int, seed: int = 0) -> dict:
    """Bits per token and per face of grids whose log-likelihoods (nats, (N,)) a prior gave.

    Returns the means and 95% percentile-bootstrap intervals of the per-face bits
    (`bits_per_face`, `bits_per_face_ci95`) and the same divided by the grid size
    (`bits_per_token`, `bits_per_token_ci95`).
    """
    bits = -np.asarray(log_likelihoods, np.float64) / math.log(2.0)
    if bits.ndim != 1 or not len(bits):
        raise ValueError(f"need a non-empty (N,) array of log-likelihoods, received shape {bits.shape}")
    rng = np.random.default_rng(seed)
    means = bits[rng.integers(0, len(bits), (BOOTSTRAP_SAMPLES, len(bits)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "bits_per_face": float(bits.mean()),
        "bits_per_face_ci95": [float(low), float(high)],
        "bits_per_token": float(bits.mean() / tokens_per_grid),
        "bits_per_token_ci95": [float(low / tokens_per_grid), float(high / tokens_per_grid)],
        "num_faces": int(len(bits)),
    }


def nearest_distances(queries: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query to its nearest reference, and that reference's index.

    Args:
        queries: (M, ...) arrays, flattened per row; references: (N, ...) of the same size per row.
    Returns: distances (M,) float64 and indices (M,) int64.
    """
    q = np.asarray(queries, np.float64).reshape(len(queries), -1)
    r = np.asarray(references, np.float64).reshape(len(references), -1)
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries and references differ in size per row: {q.shape[1]} vs {r.shape[1]}")
    reference_norms = (r**2).sum(axis=1)
    distances, indices = [], []
    for start in range(0, len(q), DISTANCE_CHUNK):
        chunk = q[start : start + DISTANCE_CHUNK]
        squared = (chunk**2).sum(axis=1)[:, None] - 2.0 * chunk @ r.T + reference_norms[None, :]
        nearest = squared.argmin(axis=1)
        indices.append(nearest)
        distances.append(np.sqrt(np.maximum(squared[np.arange(len(chunk)), nearest], 0.0)))
    return np.concatenate(distances), np.concatenate(indices)


def memorisation_check(samples: np.ndarray, held_out: np.ndarray, training: np.ndarray) -> dict:
    """Are samples closer to the training faces than faces of unseen people are?

    Both sets are compared with the training faces (pixels in [0, 1]); a prior that copies
    its training data gives samples much nearer to them than held-out faces are. Pass all
    three as the same decoder renders them (reconstructions of the held-out and training
    faces): a decoder's smoothing alone brings any face nearer to every other one, and a
    copied grid then lies at distance 0 from its training face. Returns the medians of both
    distance sets and the fraction of samples nearer than the 5th percentile of the
    held-out distances (about 0.05 when samples do not copy).
    """
    sample_distances, _ = nearest_distances(samples, training)
    held_out_distances, _ = nearest_distances(held_out, training)
    threshold = float(np.percentile(held_out_distances, 5))
    return {
        "sample_to_training_median": float(np.median(sample_distances)),
        "held_out_to_training_median": float(np.median(held_out_distances)),
        "held_out_5th_percentile": threshold,
        "samples_nearer_than_held_out_5th_percentile": float((sample_distances < threshold).mean()),
    }
