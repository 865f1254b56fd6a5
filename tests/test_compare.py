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


def test_bootstrap_interval_contains_the_mean():
    values = np.random.default_rng(0).normal(30.0, 2.0, 500)
    low, high = compare.bootstrap_interval(values)
    assert low < values.mean() < high
    assert 0.2 < high - low < 0.5, "about 2 x 1.96 x 2 / sqrt(500) = 0.35 dB wide"


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
