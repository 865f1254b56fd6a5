"""Codec baselines, bootstrap interval and the Markdown table of the comparison report."""

import numpy as np
import pandas as pd
import pytest
from conftest import face_image

from vqvae_faces import compare


@pytest.fixture(scope="module")
def faces():
    from PIL import Image

    pictures = [np.asarray(Image.fromarray(face_image(seed)).resize((32, 32), Image.BILINEAR)) for seed in range(4)]
    return np.stack(pictures)


@pytest.mark.parametrize("codec", ["JPEG", "WebP"])
def test_budget_is_respected_and_quality_is_the_highest_that_fits(faces, codec):
    budget = compare.encode_decode(faces, codec, 40).bits_per_image + 1.0
    result, fits = compare.best_quality_within(faces, codec, budget)
    assert fits and result.bits_per_image <= budget
    assert result.quality >= 40
    if result.quality < 100:
        assert compare.encode_decode(faces, codec, result.quality + 1).bits_per_image > budget
    assert result.decoded.shape == faces.shape and result.decoded.dtype == np.uint8


def test_budget_below_quality_one_is_reported(faces):
    result, fits = compare.best_quality_within(faces, "JPEG", budget_bits=100.0)
    assert not fits and result.quality == 1 and result.bits_per_image > 100.0


def test_grayscale_images_stay_grayscale(faces):
    gray = faces[..., :1]
    assert compare.encode_decode(gray, "WebP", 50).decoded.shape == gray.shape


@pytest.mark.parametrize("codec", ["JPEG", "WebP"])
def test_rate_distortion_is_monotone_in_quality(faces, codec):
    curve = compare.rate_distortion_curve(faces, codec, qualities=(5, 20, 50, 80, 95))
    assert np.all(np.diff(curve["bits_per_image"]) > 0)
    assert np.all(np.diff(curve["psnr"]) > -0.05)
    assert curve["psnr"].iloc[-1] > curve["psnr"].iloc[0] + 3


def test_the_bootstrap_interval_covers_the_true_mean_95_times_in_100():
    """300 samples of 40 faces whose true mean PSNR is 30 dB: about 95% of the intervals hold 30
    (the percentile bootstrap runs a little narrow at this size), each about 2 x 1.96 x 2 /
    sqrt(40) = 1.24 dB wide. Fixed seeds: the same count on every run."""
    rng = np.random.default_rng(0)
    intervals = np.array([compare.bootstrap_interval(rng.normal(30.0, 2.0, 40), seed=i) for i in range(300)])
    covered = ((intervals[:, 0] <= 30.0) & (30.0 <= intervals[:, 1])).mean()
    assert 0.90 <= covered <= 0.98, covered
    assert np.median(intervals[:, 1] - intervals[:, 0]) == pytest.approx(2 * 1.96 * 2.0 / np.sqrt(40), rel=0.1)


def test_lzma_size_of_constant_tokens_is_tiny():
    tokens = np.zeros((100, 16, 16), np.int16)
    assert compare.lzma_bits_per_image(tokens) < 16


def test_markdown_table():
    frame = pd.DataFrame(
        [{"method": "WebP", "psnr": 28.04321, "note": None}, {"method": "VAE", "psnr": np.nan, "note": "x"}]
    )
    assert compare.markdown_table(frame).splitlines() == [
        "| method | psnr | note |",
        "|---|---|---|",
        "| WebP | 28.04 |  |",
        "| VAE |  | x |",
    ]
