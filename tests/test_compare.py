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


def test_compressai_points_measured_on_these_faces_join_the_table_the_curve_and_the_report(faces, tmp_path, caplog):
    """What bench/bench_compressai.py leaves in images_saved/compare/ shows in the next comparison of the same
    test faces, with PSNR from each face's error; points of other faces, or a torn file, are left out with a
    warning."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_compressai

    assert bench_compressai.COMPRESSAI_FILE == compare.COMPRESSAI_FILE
    folder = tmp_path / "images_saved" / "compare"
    point = {"model": "mbt2018-mean", "lambda": 0.013, "train_minutes": 60.0, "bits_per_face": 2500.0}
    point.update(encode_faces_per_second=200.0, decode_faces_per_second=150.0, mse_per_face=[1e-3, 2e-3, 1e-3, 4e-3])
    bench_compressai.write_for_compare(tmp_path, faces, [point, {**point, "lambda": 0.025, "bits_per_face": 3500.0}])
    rows = compare.compressai_rows(folder, faces)
    # 10 log10(1 / mse): 30, 26.990, 30 and 23.979 dB, mean 27.742
    assert [row["psnr"] for row in rows] == pytest.approx([27.7423] * 2, abs=1e-4)
    assert [row["bits_per_image"] for row in rows] == [2500.0, 3500.0]
    assert rows[0]["method"] == "CompressAI mbt2018-mean" and rows[1]["setting"].startswith("lambda 0.025, 60 min")
    table = compare.write_comparison(folder, faces, {}, {}, "four faces")
    assert list(table["bits_per_image"]) == [2500.0, 3500.0]
    report = (folder / "report.html").read_text()
    assert report.count("CompressAI mbt2018-mean") == 2 and "27.74 (" in report
    assert "<td>nan</td>" not in report, "no SSIM was measured: an empty cell"

    assert compare.compressai_rows(folder, faces[::-1]) == []  # the same faces in another order
    assert "measured on other test faces" in caplog.text
    # A run of one more lambda adds its row, one of a lambda already there replaces that row; other faces: a new file.
    bench_compressai.write_for_compare(tmp_path, faces, [{**point, "lambda": 0.0067, "bits_per_face": 2000.0}])
    bench_compressai.write_for_compare(tmp_path, faces, [{**point, "bits_per_face": 2600.0}])
    assert [row["bits_per_image"] for row in compare.compressai_rows(folder, faces)] == [2000.0, 2600.0, 3500.0]
    bench_compressai.write_for_compare(tmp_path, faces[::-1], [point])
    assert [row["bits_per_image"] for row in compare.compressai_rows(folder, faces[::-1])] == [2500.0]
    (folder / compare.COMPRESSAI_FILE).write_text('{"test_faces": "0123", "rows": [')
    caplog.clear()
    assert compare.compressai_rows(folder, faces) == [] and "cannot be read" in caplog.text
    bench_compressai.write_for_compare(tmp_path, faces, [{key: v for key, v in point.items() if key != "lambda"}])
    caplog.clear()
    assert compare.compressai_rows(folder, faces) == [] and "cannot be read ('lambda')" in caplog.text
