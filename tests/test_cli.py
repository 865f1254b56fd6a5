"""End-to-end: the command line a user runs, on the bundled faces with a tiny model."""

import csv
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TINY_RUN

MAIN = str(ROOT / "vqvae_face_main.py")


def run_main(out, *args, timeout=300):
    overrides = [item for setting in TINY_RUN for item in ("--set", setting)]
    command = [sys.executable, MAIN, "--out", str(out), *overrides, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=out)


@pytest.fixture(scope="module")
def trained_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    result = run_main(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_training_writes_every_promised_file(trained_out):
    out, result = trained_out
    assert "scikit-image lfw_subset" in result.stderr
    for run in ("vqvae", "vae"):
        for name in ("best.keras", "latest.keras", "state.json", "split.json", "config.json", "history.csv"):
            assert (out / "checkpoints" / run / name).is_file(), (run, name)
        for name in ("reconstructions.png", "metrics.json", "training_curves.png", "epoch_0001.png"):
            assert (out / "images_saved" / run / name).is_file(), (run, name)
    assert (out / "checkpoints" / "vqvae" / "tokens.npz").is_file()
    assert (out / "images_saved" / "vqvae" / "codebook_usage.png").is_file()
    assert (out / "images_saved" / "augmentations.png").is_file()
    assert not list(out.rglob("*.partial*")), "no temporary files are left behind"


def tensorboard_tags(folder):
    """{tag: [steps]} of every summary in the event files under `folder`."""
    import tensorflow as tf

    tags = {}
    for path in folder.rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


def test_tensorboard_logs_scalars_per_epoch_and_reconstruction_images(trained_out):
    out, _ = trained_out
    tags = tensorboard_tags(out / "checkpoints" / "vqvae" / "tensorboard")
    for tag in ("epoch_loss", "epoch_perplexity", "epoch_active_code_fraction"):
        assert tags[tag] == [0, 0], (tag, tags[tag])  # training and validation, epoch 0
    for tag in ("epoch_codebook_evenness", "epoch_learning_rate", "epoch_revived_codes"):
        assert tags[tag] == [0], (tag, tags[tag])
    assert tags["original over reconstruction"] == [0]
    assert "epoch_kl_loss" in tensorboard_tags(out / "checkpoints" / "vae" / "tensorboard")


def test_metrics_are_consistent_with_the_saved_tokens(trained_out):
    out, result = trained_out
    metrics = json.loads((out / "images_saved" / "vqvae" / "metrics.json").read_text())
    assert metrics["num_test_images"] == 10
    assert metrics["bits_per_image"] == 4 * 4 * math.log2(16)
    assert 0 < metrics["codebook_usage"] <= 1 and 1 <= metrics["perplexity"] <= 16
    assert 0 < metrics["ssim"] <= 1 and 0 < metrics["mse"] < 1
    # the tokens are searched by decoding; each face keeps the nearest codes unless it found better ones
    assert metrics["token_search_steps"] == 50 and metrics["psnr"] >= metrics["psnr_nearest_codes"] - 1e-6
    assert "identity-disjoint test split" in metrics["dataset"]
    quality = np.load(out / "checkpoints" / "vqvae" / "test_quality.npz")
    np.testing.assert_allclose(metrics["psnr"], np.mean(10 * np.log10(1 / quality["mse"])), rtol=1e-4)
    tokens = np.load(out / "checkpoints" / "vqvae" / "tokens.npz")
    assert tokens["tokens"].shape == (10, 4, 4) and tokens["tokens"].dtype == np.int16
    split = json.loads((out / "checkpoints" / "vqvae" / "split.json").read_text())
    assert list(tokens["names"]) == split["test"]
    used = len(np.unique(tokens["tokens"])) / 16
    assert metrics["codebook_usage"] == pytest.approx(used)
    assert "psnr" in result.stdout and "vqvae" in result.stdout


def test_eval_reuses_checkpoint_and_split(trained_out):
    out, _ = trained_out
    before = json.loads((out / "images_saved" / "vqvae" / "metrics.json").read_text())
    result = run_main(out, "--eval", "--run", "vqvae")
    assert result.returncode == 0, result.stderr[-3000:]
    after = json.loads((out / "images_saved" / "vqvae" / "metrics.json").read_text())
    assert after["psnr"] == pytest.approx(before["psnr"], abs=1e-5)
    assert "Epoch" not in result.stdout


def test_rerun_with_more_epochs_resumes_from_the_saved_epoch(trained_out):
    out, _ = trained_out
    result = run_main(out, "--run", "vqvae", "--set", "epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continuing from epoch 1" in result.stderr
    assert "Epoch 2/2" in result.stdout and "Epoch 1/2" not in result.stdout
    with open(out / "checkpoints" / "vqvae" / "history.csv") as handle:
        epochs = [row["epoch"] for row in csv.DictReader(handle)]
    assert epochs == ["0", "1"]
    state = json.loads((out / "checkpoints" / "vqvae" / "state.json").read_text())
    assert state["epochs_done"] == 2 and state["finished"]


def test_architecture_change_is_refused(trained_out):
    out, _ = trained_out
    result = run_main(out, "--eval", "--run", "vqvae", "--set", "num_embeddings=32")
    assert result.returncode == 2
    assert "num_embeddings" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--eval"], "no trained model"),
        (["--set", "epochs=many"], "runs.vqvae.epochs"),
        (["--set", "data.image_size=18"], "data.image_size=18"),
        (["--data", "does-not-exist.tgz"], "does not exist"),
        (["--run", "nope"], "--run 'nope'"),
    ],
)
def test_user_mistakes_exit_2_without_traceback(tmp_path, args, message):
    result = run_main(tmp_path, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_compare_writes_the_report(trained_out):
    out, _ = trained_out
    result = run_main(out, "--compare", "--eval")
    assert result.returncode == 0, result.stderr[-3000:]
    folder = out / "images_saved" / "compare"
    for name in ("comparison.csv", "comparison.md", "comparison.png", "rate_distortion.png", "report.html"):
        assert (folder / name).is_file(), name
    table = list(csv.DictReader(open(folder / "comparison.csv")))
    methods = [row["method"] for row in table]
    assert methods[:2] == ["VQ-VAE (vqvae)", "VQ-VAE (vqvae) + entropy coding"]
    assert "VAE (vae)" in methods and "VAE (vae), posterior sample" in methods
    assert "JPEG" in methods and "WebP" in methods
    budget = float(table[0]["bits_per_image"])
    for row in table:
        if row["method"] in ("JPEG", "WebP") and row["fits_budget"] == "True":
            assert float(row["bits_per_image"]) <= budget
        assert float(row["psnr_ci95_low"]) <= float(row["psnr"]) <= float(row["psnr_ci95_high"])
    page = (folder / "report.html").read_text()
    assert "<table" in page and page.count("data:image/png;base64,") >= 4
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page
    assert all(source.startswith("data:image/png;base64,") for source in re.findall(r'src="([^"]*)"', page))
    assert "| method |" in result.stdout


def test_eval_on_other_people_with_test_data(trained_out, tmp_path):
    out, _ = trained_out
    from conftest import face_image
    from PIL import Image

    for p, person in enumerate(["Other_Person", "Someone_Else"]):
        folder = tmp_path / "other" / person
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(face_image(900 + 10 * p + i)).convert("L").save(folder / f"{person}_{i + 1:04d}.jpg")
    result = run_main(out, "--eval", "--run", "vqvae", "--test-data", str(tmp_path / "other"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "images_saved" / "vqvae" / "metrics.json").read_text())
    assert metrics["num_test_images"] == 4 and "(all images)" in metrics["dataset"]
    tokens = np.load(out / "checkpoints" / "vqvae" / "tokens.npz")
    assert list(tokens["names"]) == [f"{p}/{p}_{i:04d}.jpg" for p in ("Other_Person", "Someone_Else") for i in (1, 2)]


def test_test_data_with_other_channels_is_refused(trained_out, lfw_tree):
    out, _ = trained_out
    result = run_main(out, "--eval", "--run", "vqvae", "--test-data", str(lfw_tree))
    assert result.returncode == 2
    assert "trained on images of shape" in result.stderr and "Traceback" not in result.stderr
