"""Prior metrics against hand-computed values."""

import math

import numpy as np
import pytest

from vqvae_faces import prior_metrics


def test_code_length_in_bits_per_face_and_per_token():
    # log-likelihoods of -256 ln 2 and -512 ln 2 nats: 256 and 512 bits, 384 on average, 1.5 bits per token of 256
    summary = prior_metrics.code_length_summary(np.array([-256, -512]) * math.log(2.0), tokens_per_grid=256)
    assert summary["bits_per_face"] == pytest.approx(384.0)
    assert summary["bits_per_token"] == pytest.approx(1.5)
    low, high = summary["bits_per_face_ci95"]
    assert 256.0 <= low <= 384.0 <= high <= 512.0
    assert summary["bits_per_token_ci95"] == pytest.approx([low / 256, high / 256])
    assert summary["num_faces"] == 2


def test_the_interval_has_the_width_of_the_standard_error():
    bits = np.random.default_rng(0).normal(1600.0, 80.0, 1000)
    summary = prior_metrics.code_length_summary(-bits * math.log(2.0), tokens_per_grid=256)
    low, high = summary["bits_per_face_ci95"]
    assert high - low == pytest.approx(2 * 1.96 * 80.0 / math.sqrt(1000), rel=0.15)  # about 9.9 bits
    with pytest.raises(ValueError, match=r"received shape \(0,\)"):
        prior_metrics.code_length_summary(np.array([]), 256)


def test_nearest_distances_by_hand():
    references = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    queries = np.array([[0.0, 1.0], [3.0, 5.0], [7.0, 0.0], [3.0, 4.0]])
    distances, indices = prior_metrics.nearest_distances(queries, references)
    np.testing.assert_allclose(distances, [1.0, 1.0, 3.0, 0.0], atol=1e-9)
    np.testing.assert_array_equal(indices, [0, 1, 2, 1])
    with pytest.raises(ValueError, match="2 vs 3"):
        prior_metrics.nearest_distances(queries, np.zeros((2, 3)))


def test_nearest_distances_over_several_chunks_match_brute_force():
    rng = np.random.default_rng(1)
    queries, references = rng.random((600, 4, 4, 1)), rng.random((50, 4, 4, 1))
    distances, indices = prior_metrics.nearest_distances(queries, references)
    brute = np.sqrt(((queries.reshape(600, 1, -1) - references.reshape(1, 50, -1)) ** 2).sum(-1))
    np.testing.assert_allclose(distances, brute.min(axis=1), rtol=1e-9)
    np.testing.assert_array_equal(indices, brute.argmin(axis=1))


def test_copies_of_training_faces_are_flagged_and_fresh_faces_are_not():
    rng = np.random.default_rng(2)
    training, held_out, fresh = rng.random((200, 8, 8)), rng.random((100, 8, 8)), rng.random((100, 8, 8))
    copies = training[:100] + rng.normal(0.0, 0.01, (100, 8, 8))
    copied = prior_metrics.memorisation_check(copies, held_out, training)
    assert copied["samples_nearer_than_held_out_5th_percentile"] == 1.0
    assert copied["sample_to_training_median"] < 0.2 < copied["held_out_to_training_median"]
    honest = prior_metrics.memorisation_check(fresh, held_out, training)
    assert honest["samples_nearer_than_held_out_5th_percentile"] < 0.2
