"""End-to-end: a "prior" run beside its VQ-VAE run, through the command line a user runs.

The module fixture trains a tiny VQ-VAE (its train step run eagerly) and a tiny prior once,
in-process and with deterministic ops; each test works on its own copy of that folder.
"""

import csv
import json
import logging
import math
import shutil
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import face_image, token_log_probs
from PIL import Image

import vqvae_face_main
from vqvae_faces import lfw_files, training
from vqvae_faces.config import ConfigError, DataConfig, load_config
from vqvae_faces.integer_decoder import IntegerDecoder
from vqvae_faces.vqf_format import CONTAINER_HEADER_BYTES, HEADER_BYTES

PRIOR_EPOCHS = 2
CONFIG = {
    "deterministic": True,
    "data": {"path": "bundled", "image_size": 16},
    "runs": {
        "vq": {
            "model": "vqvae",
            "encoder_filters": [8, 16],
            "decoder_filters": [16, 8],
            "residual_hidden_channels": 8,
            "num_residual_blocks": 0,
            "embedding_dim": 4,
            "num_embeddings": 16,
            "batch_size": 16,
            "epochs": 1,
            "max_train_minutes": None,
            "token_search_steps": 0,
            "run_eagerly": True,
        },
        "pr": {
            "model": "prior",
            "tokens_from": "vq",
            "epochs": PRIOR_EPOCHS,
            "batch_size": 16,
            "max_train_minutes": None,
            "snapshot_every": 1,
            "transformer": {"width": 16, "num_layers": 1, "num_heads": 2},
            "sampling": {"eval_samples": 8, "batch_size": 8},
        },
    },
}


def main(out, *args):
    return vqvae_face_main.main(["--config", str(out / "experiment.json"), "--out", str(out), *args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("prior")
    (out / "experiment.json").write_text(json.dumps(CONFIG))
    assert main(out) == 0
    return out


@pytest.fixture
def out(trained, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(trained, copy)
    return copy


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level("INFO")


def weights(path):
    arrays = {}
    with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as handle, h5py.File(handle) as store:
        store.visititems(lambda name, item: arrays.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None)
    return arrays


def test_the_prior_trains_after_its_vqvae_and_writes_every_file(trained):
    for name in ("best.keras", "latest.keras", "state.json", "split.json", "config.json", "history.csv"):
        assert (trained / "checkpoints" / "pr" / name).is_file(), name
    for name in (
        "metrics.json",
        "training_curves.png",
        "nearest_training_faces.png",
        "samples.png",
        "epoch_0001.png",
        "bits_by_position.png",
    ):
        assert (trained / "images_saved" / "pr" / name).is_file(), name
    state = json.loads((trained / "checkpoints" / "pr" / "state.json").read_text())
    assert state["epochs_done"] == PRIOR_EPOCHS and state["monitor"] == "val_loss"
    # the prior is tested on the VQ-VAE's test faces
    split = {run: json.loads((trained / "checkpoints" / run / "split.json").read_text()) for run in ("vq", "pr")}
    assert split["pr"]["test"] == split["vq"]["test"] and split["pr"]["train"] == split["vq"]["train"]
    history = (trained / "checkpoints" / "pr" / "history.csv").read_text().splitlines()
    assert "val_bits_per_token" in history[0] and len(history) == PRIOR_EPOCHS + 1


def test_code_lengths_in_metrics_json_equal_an_independent_numpy_computation(trained):
    """Tokens from the VQ-VAE's encoder, log-softmax in NumPy: the bits the metrics report."""
    metrics = json.loads((trained / "images_saved" / "pr" / "metrics.json").read_text())
    vqvae = keras.saving.load_model(trained / "checkpoints" / "vq" / "best.keras", safe_mode=True)
    prior = keras.saving.load_model(trained / "checkpoints" / "pr" / "best.keras", safe_mode=True)
    faces = lfw_files.load_bundled_faces(DataConfig(image_size=16))
    split = lfw_files.load_split(trained / "checkpoints" / "pr" / "split.json", faces)
    for part in ("test", "val"):
        tokens = vqvae.encode_to_tokens(faces.subset(split[part]).astype(np.float32) / 255.0).numpy()
        bits = -token_log_probs(prior(tokens), tokens).sum(axis=(1, 2)) / math.log(2.0)
        assert metrics[f"{part}_num_faces"] == len(tokens)
        assert metrics[f"{part}_bits_per_face"] == pytest.approx(bits.mean(), rel=1e-5)
        assert metrics[f"{part}_bits_per_token"] == pytest.approx(bits.mean() / 16, rel=1e-5)
        low, high = metrics[f"{part}_bits_per_face_ci95"]  # about 2 x 1.96 standard errors wide
        assert high - low == pytest.approx(2 * 1.96 * bits.std() / math.sqrt(len(bits)), rel=0.35), part
    assert metrics["fixed_bits_per_image"] == 16 * 4  # 4x4 cells of log2(16) bits
    assert metrics["fid_samples"] is None and metrics["fid_reconstructions"] is None  # no Inception weights given
    assert metrics["memorisation"]["num_samples"] == 8  # its figures: test_a_prior_that_copies_...


def test_a_prior_learns_augmented_tokens_with_dropout_and_decoupled_weight_decay(out, caplog):
    settings = ["augmentation.enabled=true", "transformer.dropout=0.2", "weight_decay=0.1", "epochs=1"]
    assert main(out, "--run", "pr", "--retrain", *[item for s in settings for item in ("--set", s)]) == 0
    faces = len(json.loads((out / "checkpoints" / "pr" / "split.json").read_text())["train"])
    # the prior's own defaults, not the data's (the embedded faces are grey: no saturation)
    operations = "['random_brightness', 'random_contrast', 'random_rotation', 'random_translation', 'random_zoom']"
    assert f"tokens of fresh variants of {2 * faces} faces every epoch ({operations})" in caplog.text
    prior = keras.saving.load_model(out / "checkpoints" / "pr" / "latest.keras", safe_mode=True)
    assert prior.dropout == 0.2 and all(block.dropout == 0.2 for block in prior.blocks)
    assert isinstance(prior.optimizer, keras.optimizers.AdamW) and prior.optimizer.weight_decay == 0.1
    history = (out / "checkpoints" / "pr" / "history.csv").read_text().splitlines()
    assert len(history) == 2 and "nan" not in history[1]


def test_a_stopped_prior_resumes_to_the_weights_of_an_uninterrupted_run(out, trained):
    """One epoch, then a rerun asking for two: bit for bit the fixture's two-epoch prior."""
    shutil.rmtree(out / "checkpoints" / "pr")
    config = load_config(out / "experiment.json", ["epochs=1"], ["pr"])
    faces = lfw_files.load_faces(config.data, out / "checkpoints" / "data_cache", [])
    training.enable_determinism()
    training.train_run(config, "pr", faces, out)
    training.train_run(load_config(out / "experiment.json", [], ["pr"]), "pr", faces, out)
    expected = weights(trained / "checkpoints" / "pr" / "latest.keras")
    actual = weights(out / "checkpoints" / "pr" / "latest.keras")
    assert expected.keys() == actual.keys() and any("optimizer" in name for name in expected)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def test_sample_writes_every_promised_file_and_repeats_with_its_seed(out, tmp_path):
    assert main(out, "--sample", "10") == 0
    folder = out / "images_saved" / "pr"
    with np.load(folder / "samples.npz", allow_pickle=False) as saved:
        first = dict(saved)
    assert first["tokens"].shape == (10, 4, 4) and first["tokens"].min() >= 0 and first["tokens"].max() < 16
    assert (int(first["seed"]), float(first["temperature"]), int(first["batch_size"])) == (1234, 1.0, 8)
    for name in ("samples.png", "nearest_training_faces.png"):
        assert (folder / name).stat().st_size > 1000
    assert main(out, "--sample", "10") == 0
    with np.load(folder / "samples.npz", allow_pickle=False) as saved:
        np.testing.assert_array_equal(saved["tokens"], first["tokens"])
    assert main(out, "--sample", "10", "--seed", "7") == 0
    with np.load(folder / "samples.npz", allow_pickle=False) as saved:
        assert int(saved["seed"]) == 7
        other = saved["tokens"]
    assert (other != first["tokens"]).mean() > 0.5, "another seed draws other faces"
    assert main(out, "--sample", "10", "--seed", "7", "--set", "sampling.top_k=1") == 0
    with np.load(folder / "samples.npz", allow_pickle=False) as saved:
        greedy = saved["tokens"]
    assert (greedy == greedy[0]).all(), "top_k=1 always takes the most likely token: every sample is the same"


def test_a_prior_without_a_trained_vqvae_is_one_line_naming_it(tmp_path, caplog):
    (tmp_path / "experiment.json").write_text(json.dumps(CONFIG))
    assert main(tmp_path, "--run", "pr") == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "VQ-VAE run 'vq'" in errors[0] and "train it first" in errors[0]


def test_a_prior_of_tokens_that_changed_is_refused(out, caplog):
    vq = out / "checkpoints" / "vq"
    shutil.copy(vq / "latest.keras", vq / "best.keras")  # another model file: other tokens
    assert main(out, "--eval", "--run", "pr") == 2
    assert "its tokens changed" in caplog.text and "--retrain" in caplog.text


def test_eval_on_other_people_tokenizes_them_with_the_vqvae(out, lfw_tree, tmp_path, caplog):
    grey = tmp_path / "grey" / "lfw-deepfunneled"
    for person in range(4):
        (grey / f"Person_{person}").mkdir(parents=True)
        for number in range(2):
            picture = Image.fromarray(face_image(10 * person + number)).convert("L")
            picture.save(grey / f"Person_{person}" / f"Person_{person}_{number + 1:04d}.png")
    assert main(out, "--eval", "--run", "pr", "--test-data", str(grey)) == 0
    metrics = json.loads((out / "images_saved" / "pr" / "metrics.json").read_text())
    assert metrics["test_num_faces"] == 8 and "val_bits_per_face" not in metrics
    assert "(all images)" in metrics["dataset"]
    assert main(out, "--eval", "--run", "pr", "--test-data", str(lfw_tree)) == 2  # colour faces, grey VQ-VAE
    assert "trained on images of shape (16, 16, 1)" in caplog.text


@pytest.mark.parametrize(
    "run, message",
    [
        ({"model": "prior"}, "tokens_from is missing"),
        ({"model": "prior", "tokens_from": "nothing"}, "must name a VQ-VAE run"),
        ({"model": "prior", "tokens_from": "vae"}, "must name a VQ-VAE run"),
        ({"model": "vqvae", "tokens_from": "vq"}, "tokens_from is a setting of 'prior' runs, not of a 'vqvae' run"),
        ({"model": "prior", "tokens_from": "vq", "transformer": {"width": 10, "num_heads": 4}}, "divisible"),
        ({"model": "prior", "tokens_from": "vq", "codec": {"search_steps": -1}}, r"p\.codec\.search_steps=-1"),
    ],
)
def test_prior_settings_are_checked(tmp_path, run, message):
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps({"runs": {"vq": {}, "vae": {"model": "vae"}, "p": run}}))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_priors_get_their_own_training_defaults_and_train_after_their_vqvae(tmp_path):
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps({"runs": {"p": {"model": "prior", "tokens_from": "vq"}, "vq": {}}}))
    config = load_config(path)
    assert (config.runs["p"].batch_size, config.runs["p"].learning_rate) == (32, 1e-3)
    assert config.runs["vq"].batch_size == 8  # the autoencoder recipe is untouched
    assert config.training_order(["p", "vq"]) == ["vq", "p"]
    assert config.training_order(["p"]) == ["p"]  # a VQ-VAE that is not selected must be trained already
    assert config.token_alphabet("p") == (512, (16, 16))


def test_compare_reports_real_vqf_file_sizes_that_equal_the_bytes_on_disk(out):
    assert main(out, "--compare", "--set", "codec.compare_lambdas=[0, 1]") == 0
    rows = list(csv.DictReader(open(out / "images_saved" / "compare" / "comparison.csv")))
    table = {(row["method"], row["rate_lambda"]): row for row in rows}
    ideal = next(row for row in rows if row["method"] == "VQ-VAE (vq) + prior (pr)")
    for rate_lambda in ("0.0", "1.0"):
        row = table[("VQ-VAE codec (pr)", rate_lambda)]
        files = sorted(Path(row["files"]).glob("*.vqf"))
        assert len(files) == 10  # every test face of the bundled split
        assert float(row["bits_per_image"]) == pytest.approx(np.mean([8 * f.stat().st_size for f in files]))
        container = Path(row["files"] + ".vqfs")
        assert float(row["container_bits_per_image"]) == pytest.approx(8 * container.stat().st_size / 10)
        assert float(row["container_bits_per_image"]) < float(row["payload_bits_per_image"])
    nearest = table[("VQ-VAE codec (pr)", "0.0")]
    # the same tokens, the nearest codes; the codec's row scores the 8-bit faces --decode writes
    assert float(nearest["psnr"]) == pytest.approx(float(ideal["psnr"]), abs=0.05)
    # a real file is the ideal code length plus the header and at most a few bits of coder overhead
    assert (
        float(ideal["bits_per_image"])
        < float(nearest["payload_bits_per_image"]) + 1
        < float(ideal["bits_per_image"]) + 40
    )


def test_encode_and_decode_photos_on_the_command_line(out, tmp_path, caplog):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(face_image(1)).convert("L").save(photos / "lfw_style.jpg", quality=95)
    Image.fromarray(face_image(2)[:180]).save(photos / "wide.png")
    centre_crop = ["--set", 'data.face_alignment="lfw"']  # the detector finds no face in these patterns
    assert main(out, "--encode", str(photos / "lfw_style.jpg"), str(photos / "wide.png"), *centre_crop) == 0
    assert "wide.png: 250x180 pixels, not a 250x250 LFW-style crop" in caplog.text
    assert (photos / "lfw_style.vqf").read_bytes()[0] == 0xF3  # format 3
    assert main(out, "--decode", str(photos / "lfw_style.vqf"), "--to", str(tmp_path / "decoded")) == 0
    decoded = np.asarray(Image.open(tmp_path / "decoded" / "lfw_style.png"))
    vqvae = keras.saving.load_model(out / "checkpoints" / "vq" / "best.keras", safe_mode=True)
    face, _ = lfw_files.decode_photo((photos / "lfw_style.jpg").read_bytes(), DataConfig(image_size=16), 1)
    tokens = vqvae.encode_to_tokens(face[None].astype(np.float32) / 255.0).numpy()
    np.testing.assert_array_equal(decoded, IntegerDecoder(vqvae).pixels(tokens)[0, ..., 0])  # the portable faces
    floats = np.round(np.clip(vqvae.decode_tokens(tokens).numpy()[0, ..., 0], 0, 1) * 255)
    assert np.abs(decoded - floats).max() <= 1
    before = (photos / "wide.png").read_bytes()
    assert main(out, "--decode", str(photos / "wide.vqf")) == 2  # would replace the user's wide.png
    assert "wide.png already exists: pass --overwrite" in caplog.text and (photos / "wide.png").read_bytes() == before
    (photos / "junk.jpg").write_text("not a photo")
    assert main(out, "--encode", str(photos / "junk.jpg")) == 2 and "junk.jpg: not a readable image" in caplog.text
    assert not (photos / "junk.vqf").exists()
    # Both photos in one container: its faces decode to the pictures of the single files.
    both = [str(photos / "lfw_style.jpg"), str(photos / "wide.png")]
    assert main(out, "--encode", *both, "--into", str(tmp_path / "all.vqfs"), *centre_crop) == 0
    payloads = [(photos / name).stat().st_size - HEADER_BYTES for name in ("lfw_style.vqf", "wide.vqf")]
    assert (tmp_path / "all.vqfs").stat().st_size - CONTAINER_HEADER_BYTES <= sum(payloads)  # one coder's end, not two
    assert main(out, "--decode", str(tmp_path / "all.vqfs"), "--to", str(tmp_path / "decoded")) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "decoded" / "all-1.png")), decoded)
    assert main(out, "--decode", str(photos / "wide.vqf"), "--to", str(tmp_path / "decoded")) == 0
    wide = np.asarray(Image.open(tmp_path / "decoded" / "wide.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "decoded" / "all-2.png")), wide)
    truncated = tmp_path / "truncated.vqfs"
    truncated.write_bytes((tmp_path / "all.vqfs").read_bytes()[:30])
    assert main(out, "--decode", str(truncated), "--to", str(tmp_path / "never")) == 2
    assert "truncated.vqfs is corrupt" in caplog.text and not (tmp_path / "never").exists()
    assert main(out, "--encode", *both, "--into", str(tmp_path / "all.vqfs")) == 2  # never replaced silently
    assert "all.vqfs already exists: pass --overwrite" in caplog.text
    assert main(out, "--decode", str(photos / "lfw_style.vqf"), "--into", str(tmp_path / "x.vqfs")) == 2
    assert "--into" in caplog.text and not (tmp_path / "x.vqfs").exists()


def pixel_statistics(images):
    """A stand-in feature network for the FID: each face's mean and spread (RGB input, N x 2)."""
    images = np.asarray(images, np.float64)
    return np.stack([images.mean(axis=(1, 2, 3)), images.std(axis=(1, 2, 3))], axis=1)


def test_a_prior_that_copies_training_grids_is_flagged_and_one_that_does_not_is_not(out, monkeypatch, caplog):
    """Samples replaced by the VQ-VAE's grids of training faces (a prior that copies) are all nearer a
    training face than the held-out faces' 5th percentile; the grids of validation faces (other people:
    a prior that draws new faces) are not. The FID of the copies, with a stand-in feature network,
    equals NumPy's on the same faces."""
    from vqvae_faces import fid
    from vqvae_faces.token_prior import CausalTransformer

    vqvae = keras.saving.load_model(out / "checkpoints" / "vq" / "best.keras", safe_mode=True)
    faces = lfw_files.load_bundled_faces(DataConfig(image_size=16))
    split = lfw_files.load_split(out / "checkpoints" / "pr" / "split.json", faces)
    grids = {
        part: vqvae.encode_to_tokens(faces.subset(split[part]).astype(np.float32) / 255.0).numpy()
        for part in ("train", "val")
    }
    monkeypatch.setattr(fid, "feature_network", lambda weights: ("pixel statistics", pixel_statistics))
    figures = {}
    for part in ("train", "val"):
        drawn = np.resize(grids[part], (8, 4, 4))  # 8 samples (sampling.eval_samples)
        monkeypatch.setattr(CausalTransformer, "sample_tokens", lambda self, count, *a, d=drawn: tf.constant(d[:count]))
        assert main(out, "--eval", "--run", "pr", "--set", "sampling.fid_samples=8") == 0
        figures[part] = json.loads((out / "images_saved" / "pr" / "metrics.json").read_text())
    copied, fresh = figures["train"]["memorisation"], figures["val"]["memorisation"]
    assert copied["samples_nearer_than_held_out_5th_percentile"] == 1.0, copied
    assert copied["sample_to_training_median"] < copied["held_out_to_training_median"] / 2
    assert fresh["samples_nearer_than_held_out_5th_percentile"] <= 0.25, fresh
    metrics = figures["train"]
    assert metrics["fid_network"] == "pixel statistics" and metrics["fid_num_samples"] == 8
    originals = faces.subset(split["test"]).astype(np.float32) / 255.0
    decoded = {
        "samples": vqvae.decode_tokens(np.resize(grids["train"], (8, 4, 4))).numpy(),
        "reconstructions": vqvae.decode_tokens(vqvae.encode_to_tokens(originals)).numpy(),
    }
    real = pixel_statistics(np.repeat(originals, 3, axis=-1))
    for name, images in decoded.items():
        expected = fid.frechet_distance(real, pixel_statistics(np.repeat(np.clip(images, 0, 1), 3, axis=-1)))
        assert metrics[f"fid_{name}"] == pytest.approx(expected, rel=1e-4), name
    caplog.set_level(logging.INFO)
    assert main(out, "--eval", "--run", "pr", "--set", "sampling.fid_samples=0") == 0
    metrics = json.loads((out / "images_saved" / "pr" / "metrics.json").read_text())
    assert metrics["fid_samples"] is None and "FID not computed (sampling.fid_samples=0)" in caplog.text


def test_a_full_disk_at_the_prior_s_and_the_codec_s_writes_is_one_line_and_keeps_what_was_there(
    out, tmp_path, monkeypatch, caplog
):
    import errno
    import re

    from vqvae_faces import atomic_files

    photo = tmp_path / "face.png"
    Image.fromarray(face_image(3)).convert("L").save(photo)
    assert main(out, "--encode", str(photo)) == 0
    real_replace, failing = atomic_files.fsync_replace, {}

    def replace(tmp, final):
        if re.fullmatch(failing["name"], Path(final).name):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(tmp, final)

    monkeypatch.setattr(atomic_files, "fsync_replace", replace)
    steps = [
        ("metrics.json", ["--eval", "--run", "pr"], out / "images_saved" / "pr" / "metrics.json"),
        ("samples.npz", ["--sample", "4"], None),
        ("face.vqf", ["--encode", str(photo), "--overwrite"], photo.with_suffix(".vqf")),
        ("all.vqfs", ["--encode", str(photo), "--into", str(tmp_path / "all.vqfs")], None),
        ("face.png", ["--decode", str(photo.with_suffix(".vqf")), "--overwrite"], photo),
    ]
    for name, args, kept in steps:
        before = kept.read_bytes() if kept else None
        failing["name"] = name
        caplog.clear()
        assert main(out, *args) == 2, name
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and errors[0].startswith("cannot write ") and name in errors[0], errors
        assert not list(out.rglob("*.partial.*")) and not list(tmp_path.rglob("*.partial.*"))
        if kept:
            assert kept.read_bytes() == before, f"{kept.name} is the earlier file"
    assert not (tmp_path / "all.vqfs").exists()


def test_the_codec_s_command_lines_across_processes_and_every_mistake_as_one_line(out, tmp_path, monkeypatch, caplog):
    """`--encode` here (one TensorFlow thread, the token search and the rate term from the command
    line), `--decode` by another program with another thread count: the same faces as a decode here.
    Then each mistake a user makes with these flags: one line, exit 2, nothing written."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, TWO_THREADS

    from vqvae_faces import codec_files

    photos = tmp_path / "photos"
    photos.mkdir()
    for number in range(3):
        Image.fromarray(face_image(40 + number)).convert("L").save(photos / f"p{number}.jpg", quality=95)
    names = [str(photos / f"p{number}.jpg") for number in range(3)]
    real_encode, seen = codec_files.encode_photos, []

    def spy(codec, photos, config, rate_lambda, *options):
        seen.append((codec.search_steps, rate_lambda))
        return real_encode(codec, photos, config, rate_lambda, *options)

    monkeypatch.setattr(codec_files, "encode_photos", spy)
    assert main(out, "--encode", *names, "--set", "codec.search_steps=3", "--rate-lambda", "2") == 0
    assert seen == [(3, 2.0)], "the flags reach the codec"
    here, there = tmp_path / "here", tmp_path / "there"
    vqf = [str(photos / f"p{n}.vqf") for n in range(3)]
    assert main(out, "--decode", *vqf, "--to", str(here)) == 0
    command = [sys.executable, str(ROOT / "vqvae_face_main.py"), "--config", str(out / "experiment.json")]
    command += ["--out", str(out), "--decode", *vqf, "--to", str(there)]
    other = {name: "1" if os.environ.get(name) == "2" else "2" for name in TWO_THREADS}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, **other})
    assert result.returncode == 0, result.stderr[-3000:]
    for n in range(3):
        np.testing.assert_array_equal(
            np.asarray(Image.open(there / f"p{n}.png")), np.asarray(Image.open(here / f"p{n}.png")), err_msg=str(n)
        )
    # --overwrite replaces what is there
    (here / "p0.png").write_bytes(b"old")
    assert main(out, "--decode", vqf[0], "--to", str(here)) == 2 and (here / "p0.png").read_bytes() == b"old"
    assert main(out, "--decode", vqf[0], "--to", str(here), "--overwrite") == 0
    np.testing.assert_array_equal(np.asarray(Image.open(here / "p0.png")), np.asarray(Image.open(there / "p0.png")))

    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copy(photos / "p0.jpg", twin / "p0.jpg")
    no_prior = tmp_path / "no_prior.json"
    no_prior.write_text(json.dumps({**CONFIG, "runs": {"vq": CONFIG["runs"]["vq"]}}))
    other_models = tmp_path / "other_models"
    shutil.copytree(out, other_models)
    pr = other_models / "checkpoints" / "pr"
    shutil.copy(pr / "latest.keras", pr / "best.keras")  # another prior file: other fingerprints
    mistakes = [
        (["--config", str(no_prior), "--encode", names[0]], "need a prior run"),
        (["--out", str(tmp_path / "untrained"), "--encode", names[0]], "no trained model for run"),
        (["--encode", str(photos / "missing.jpg")], "missing.jpg does not exist"),
        (["--encode", names[0], "--to", str(tmp_path / "big"), "--set", "data.max_file_bytes=1000"], "larger than"),
        (["--encode", names[0], str(twin / "p0.jpg"), "--to", str(tmp_path / "one")], "would both be written to"),
        (["--out", str(other_models), "--decode", vqf[0], "--to", str(tmp_path / "never")], "other models"),
        (["--decode", str(photos / "missing.vqf")], "missing.vqf does not exist"),
        # inputs are checked before the models are looked for
        (["--out", str(tmp_path / "untrained"), "--encode", str(photos / "missing.jpg")], "missing.jpg does not exist"),
        (["--out", str(tmp_path / "untrained"), "--decode", names[0]], "larger than the largest .vqfs container"),
    ]
    monkeypatch.setattr(codec_files, "MAX_CODED_BYTES", 1000)  # a photo is not a .vqf: larger than this one allows
    for args, message in mistakes:
        caplog.clear()
        argv = ["--config", str(out / "experiment.json"), "--out", str(out), *args]
        assert vqvae_face_main.main(argv) == 2, args
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], (args, errors)
    assert not any((tmp_path / name).exists() for name in ("one", "never", "big"))
    assert not (photos / "missing.vqf").exists() and not list((tmp_path / "untrained").rglob("*.vqf"))


def test_the_prior_s_tensorboard_logs_hold_its_curves_and_samples(trained):
    from test_cli import tensorboard_tags

    tags = tensorboard_tags(trained / "checkpoints" / "pr" / "tensorboard")
    for tag in ("epoch_loss", "epoch_bits_per_token"):
        assert sorted(tags[tag]) == [0, 0, 1, 1], (tag, tags[tag])  # training and validation, two epochs
    assert tags["epoch_learning_rate"] == [0, 1]
    history = pd.read_csv(trained / "checkpoints" / "pr" / "history.csv")
    np.testing.assert_allclose(history["bits_per_token"], history["loss"] / math.log(2.0), rtol=1e-5)
    assert any(sorted(steps) == [0, 1] for tag, steps in tags.items() if "sample" in tag), sorted(tags)
