"""End-to-end: the command line a user runs, on the bundled faces with a tiny model.

The module fixture runs `main(argv)` once to train every run of the shipped experiment.json
and compare them; every other case runs `main(argv)` on its own copy of that folder, so no
test depends on another's order. (The real script runs as a program in the resume, signal
and multi-worker tests.)
"""

import contextlib
import csv
import io
import json
import logging
import math
import re
import shutil
import zipfile
from dataclasses import dataclass

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import COMPILED, ON_THE_FLY, TINY_RUN, write_archive
from PIL import Image

import vqvae_face_main
from vqvae_faces import compare, lfw_files
from vqvae_faces.config import DataConfig

# 32x32 faces with one stride-2 stage: a 16x16 grid of 4-bit tokens, 1,024 bits, a budget that WebP can
# meet and JPEG cannot, so --compare's rule "the highest quality that fits" is exercised.
CLI_RUN = TINY_RUN + ON_THE_FLY + ["data.image_size=32", "encoder_filters=[8]", "decoder_filters=[8]"]
CLI_RUN += ["num_residual_blocks=1"]
IMAGE_SIZE, GRID = 32, 16


def cli_args(out, *args):
    # "--data bundled": the embedded faces, even where an lfw-deepfunneled folder lies beside the script.
    overrides = [item for setting in CLI_RUN for item in ("--set", setting)]
    return ["--out", str(out), "--data", "bundled", *overrides, *args]


def main(out, *args):
    return vqvae_face_main.main(cli_args(out, *args))


@dataclass
class Printed:
    """What the fixture's command printed: standard output, and its log lines."""

    stdout: str
    log: str


@pytest.fixture(scope="module")
def trained_out(tmp_path_factory):
    """Every run trained one epoch (the compiled train step) and compared, tokens chosen by the full
    50-step search. The tests on copies of it step eagerly (TINY_RUN)."""
    out = tmp_path_factory.mktemp("cli")
    stdout, log = io.StringIO(), io.StringIO()
    root, handler = logging.getLogger(), logging.StreamHandler(log)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(stdout):
            code = main(out, "--compare", "--set", "token_search_steps=50", *[f"--set={s}" for s in COMPILED])
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert code == 0, log.getvalue()[-3000:]
    return out, Printed(stdout.getvalue(), log.getvalue())


@pytest.fixture
def out_copy(trained_out, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(trained_out[0], copy)
    return copy


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level("INFO")


def test_training_writes_every_promised_file(trained_out):
    out, result = trained_out
    assert "scikit-image lfw_subset" in result.log
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


def saved_test_faces(out):
    """The saved test split's faces as the run saw them: names from split.json, pixels in [0, 1]."""
    split = json.loads((out / "checkpoints" / "vqvae" / "split.json").read_text())
    faces = lfw_files.load_bundled_faces(DataConfig(image_size=IMAGE_SIZE))
    index = [list(faces.names).index(name) for name in split["test"]]
    return split["test"], faces.images[index].astype(np.float64) / 255.0


def test_metrics_recomputed_from_the_saved_tokens_and_model_equal_metrics_json(trained_out):
    out, result = trained_out
    metrics = json.loads((out / "images_saved" / "vqvae" / "metrics.json").read_text())
    assert metrics["num_test_images"] == 10
    assert metrics["bits_per_image"] == GRID * GRID * math.log2(16)
    # the tokens are searched by decoding; each face keeps the nearest codes unless it found better ones
    assert metrics["token_search_steps"] == 50 and metrics["psnr"] >= metrics["psnr_nearest_codes"] - 1e-6
    assert "identity-disjoint test split" in metrics["dataset"]
    tokens = np.load(out / "checkpoints" / "vqvae" / "tokens.npz")
    names, originals = saved_test_faces(out)
    assert tokens["tokens"].shape == (10, GRID, GRID) and tokens["tokens"].dtype == np.int16
    assert list(tokens["names"]) == names
    import vqvae_class_keras  # noqa: F401  (registers the model classes)

    model = keras.saving.load_model(out / "checkpoints" / "vqvae" / "best.keras", safe_mode=True)
    decoded = model.decode_tokens(tokens["tokens"].astype(np.int32)).numpy().astype(np.float64)
    mse = ((decoded - originals) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(metrics["mse"], mse.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["psnr"], np.mean(10 * np.log10(1 / mse)), rtol=1e-5)
    counts = np.bincount(tokens["tokens"].ravel(), minlength=16)
    p = counts[counts > 0] / counts.sum()
    assert metrics["codebook_usage"] == pytest.approx((counts > 0).mean())
    assert metrics["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert metrics["entropy_coded_bits_per_image"] == pytest.approx(GRID * GRID * -(p * np.log2(p)).sum(), rel=1e-6)
    assert "psnr" in result.stdout and "vqvae" in result.stdout


def test_eval_reuses_checkpoint_and_split(out_copy, capsys):
    before = json.loads((out_copy / "images_saved" / "vqvae" / "metrics.json").read_text())
    assert main(out_copy, "--eval", "--run", "vqvae", "--set", "token_search_steps=50") == 0
    after = json.loads((out_copy / "images_saved" / "vqvae" / "metrics.json").read_text())
    assert after["psnr"] == pytest.approx(before["psnr"], abs=1e-5)
    assert "Epoch" not in capsys.readouterr().out


def test_rerun_with_more_epochs_resumes_from_the_saved_epoch(out_copy, capsys, caplog):
    assert main(out_copy, "--run", "vqvae", "--set", "epochs=2", "--set", "token_search_steps=2") == 0
    assert "continuing from epoch 1" in caplog.text
    printed = capsys.readouterr().out
    assert "Epoch 2/2" in printed and "Epoch 1/2" not in printed
    with open(out_copy / "checkpoints" / "vqvae" / "history.csv") as handle:
        epochs = [row["epoch"] for row in csv.DictReader(handle)]
    assert epochs == ["0", "1"]
    state = json.loads((out_copy / "checkpoints" / "vqvae" / "state.json").read_text())
    assert state["epochs_done"] == 2 and state["finished"]


def test_an_early_stopped_run_stays_finished_when_the_budget_is_raised(out_copy, capsys, caplog):
    folder = out_copy / "checkpoints" / "vqvae"
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "stopped_by": "early stopping"}))
    before = (folder / "latest.keras").read_bytes()
    assert main(out_copy, "--run", "vqvae", "--set", "epochs=3", "--set", "token_search_steps=0") == 0
    assert "already finished (1 epochs, stopped by early stopping)" in caplog.text
    assert "Epoch" not in capsys.readouterr().out
    assert (folder / "latest.keras").read_bytes() == before


def test_architecture_or_image_size_change_is_refused(out_copy, caplog):
    assert main(out_copy, "--eval", "--run", "vqvae", "--set", "num_embeddings=32") == 2
    assert "num_embeddings: checkpoint 16, config 32" in caplog.records[-1].getMessage()
    assert main(out_copy, "--run", "vqvae", "--set", "data.image_size=16", "--set", "epochs=3") == 2
    assert "data.image_size: checkpoint 32, config 16" in caplog.records[-1].getMessage()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--eval"], "no trained model"),
        (["--set", "epochs=many"], "runs.vqvae.epochs"),
        (["--set", "data.image_size=17"], "data.image_size=17"),
        (["--data", "does-not-exist.tgz"], "does not exist"),
        (["--run", "nope"], "--run 'nope'"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path, caplog, args, message):
    assert main(tmp_path, *args) == 2
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0].getMessage()
    assert "\n" not in errors[0].getMessage()


def test_compare_reports_numbers_that_an_independent_computation_reproduces(trained_out):
    """The token budget (16x16 grid x 4 bits = 1,024 bits) is one WebP can meet, so the budget rule is
    exercised; every row is checked against metrics.json or recomputed with NumPy and Pillow."""
    out, result = trained_out
    folder = out / "images_saved" / "compare"
    for name in ("comparison.csv", "comparison.md", "comparison.png", "rate_distortion.png", "report.html"):
        assert (folder / name).is_file(), name
    table = {row["method"]: row for row in csv.DictReader(open(folder / "comparison.csv"))}
    vq = json.loads((out / "images_saved" / "vqvae" / "metrics.json").read_text())
    vae = json.loads((out / "images_saved" / "vae" / "metrics.json").read_text())
    budget = GRID * GRID * math.log2(16)
    row = table["VQ-VAE (vqvae)"]
    assert float(row["bits_per_image"]) == budget == vq["bits_per_image"]
    assert float(row["psnr"]) == pytest.approx(vq["psnr"]) and float(row["ssim"]) == pytest.approx(vq["ssim"])
    entropy = table["VQ-VAE (vqvae) + entropy coding"]
    assert float(entropy["bits_per_image"]) == pytest.approx(vq["entropy_coded_bits_per_image"])
    assert float(table["VAE (vae)"]["psnr"]) == pytest.approx(vae["psnr"])
    assert float(table["VAE (vae), posterior sample"]["psnr"]) == pytest.approx(vae["psnr_posterior_sample"])
    assert float(table["VAE (vae)"]["bits_per_image"]) == pytest.approx(vae["kl_bits_per_image"])
    webp = table["WebP"]
    assert webp["fits_budget"] == "True" and float(webp["bits_per_image"]) <= budget
    quality = int(float(webp["codec_quality"]))
    split = json.loads((out / "checkpoints" / "vqvae" / "split.json").read_text())
    faces = lfw_files.load_bundled_faces(DataConfig(image_size=IMAGE_SIZE))
    images = faces.images[[list(faces.names).index(name) for name in split["test"]]]
    assert compare.encode_decode(images, "WebP", quality + 1).bits_per_image > budget, "the highest quality that fits"
    psnr, sizes = [], []
    for image in images:
        encoded = io.BytesIO()
        Image.fromarray(image[..., 0]).save(encoded, format="WEBP", quality=quality, method=6)
        sizes.append(8 * encoded.tell())
        decoded = np.asarray(Image.open(encoded).convert("L")).astype(np.float64)  # WebP stores grey as RGB
        psnr.append(10 * np.log10(255.0**2 / np.mean((decoded - image[..., 0]) ** 2)))
    assert float(webp["bits_per_image"]) == pytest.approx(np.mean(sizes))
    assert float(webp["psnr"]) == pytest.approx(np.mean(psnr), rel=1e-4)
    # Each interval is about the width the per-face spread gives its mean: 2 x 1.96 x standard error.
    with np.load(out / "checkpoints" / "vqvae" / "test_quality.npz", allow_pickle=False) as quality:
        assert list(quality["names"]) == split["test"]
        per_face = {"WebP": np.array(psnr), "VQ-VAE (vqvae)": quality["psnr"]}
    assert float(row["psnr"]) == pytest.approx(per_face["VQ-VAE (vqvae)"].mean())
    for method, values in per_face.items():
        width = float(table[method]["psnr_ci95_high"]) - float(table[method]["psnr_ci95_low"])
        assert width == pytest.approx(2 * 1.96 * values.std() / np.sqrt(len(values)), rel=0.3), method
    page = (folder / "report.html").read_text()
    assert "<table" in page and page.count("data:image/png;base64,") >= 4
    headers = re.findall(r"<th>([^<]*)</th>", page)  # five columns fit a page; comparison.csv holds them all
    assert headers == ["method", "bits per face", "PSNR dB (95% interval)", "SSIM", "setting"]
    low, high = float(row["psnr_ci95_low"]), float(row["psnr_ci95_high"])
    assert f"<td>{float(row['psnr']):.2f} ({low:.2f} to {high:.2f})</td>" in page
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page
    assert all(source.startswith("data:image/png;base64,") for source in re.findall(r'src="([^"]*)"', page))
    assert "| method |" in result.stdout


def test_eval_on_other_people_with_test_data(out_copy, tmp_path):
    from conftest import face_image

    for p, person in enumerate(["Other_Person", "Someone_Else"]):
        folder = tmp_path / "other" / person
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(face_image(900 + 10 * p + i)).convert("L").save(folder / f"{person}_{i + 1:04d}.jpg")
    args = ["--eval", "--run", "vqvae", "--test-data", str(tmp_path / "other"), "--set", "token_search_steps=2"]
    assert main(out_copy, *args) == 0
    metrics = json.loads((out_copy / "images_saved" / "vqvae" / "metrics.json").read_text())
    assert metrics["num_test_images"] == 4 and "(all images)" in metrics["dataset"]
    tokens = np.load(out_copy / "checkpoints" / "vqvae" / "tokens.npz")
    assert list(tokens["names"]) == [f"{p}/{p}_{i:04d}.jpg" for p in ("Other_Person", "Someone_Else") for i in (1, 2)]
    # the same people in a .tgz archive: the same faces, the same figures
    archive = write_archive(tmp_path / "other", tmp_path / "other.tgz")
    assert main(out_copy, "--eval", "--run", "vqvae", "--test-data", str(archive), "--set", "token_search_steps=2") == 0
    again = json.loads((out_copy / "images_saved" / "vqvae" / "metrics.json").read_text())
    assert again["num_test_images"] == 4 and again["psnr"] == pytest.approx(metrics["psnr"], rel=1e-6)


def test_test_data_with_other_channels_is_refused(out_copy, lfw_tree, caplog):
    assert main(out_copy, "--eval", "--run", "vqvae", "--test-data", str(lfw_tree)) == 2
    assert "trained on images of shape" in caplog.records[-1].getMessage()


def test_evaluations_share_a_run_while_training_is_refused(out_copy, caplog):
    """Another process evaluating the run (its shared lock held here, on a descriptor of its own, as
    a second process holds it): a second evaluation succeeds; training is refused at once."""
    from vqvae_faces.run_folder import run_lock

    with run_lock(out_copy / "checkpoints" / "vqvae", exclusive=False):
        assert main(out_copy, "--eval", "--run", "vqvae", "--set", "token_search_steps=2") == 0
        assert main(out_copy, "--run", "vqvae", "--set", "epochs=2") == 2
        message = caplog.records[-1].getMessage()
        assert "cannot train run folder" in message and "another process is training or evaluating it" in message
    assert json.loads((out_copy / "checkpoints" / "vqvae" / "state.json").read_text())["epochs_done"] == 1


def test_lfw_deepfunneled_is_found_beside_the_script_or_in_the_current_folder(lfw_tree, tmp_path, monkeypatch):
    from vqvae_faces import lfw_files

    beside, current = tmp_path / "script", tmp_path / "cwd"
    beside.mkdir()
    current.mkdir()
    monkeypatch.chdir(current)
    monkeypatch.setattr(vqvae_face_main, "SCRIPT_DIR", beside)
    found = []

    class Resolved(Exception):
        pass

    def resolve_only(data, cache, search_dirs):  # stands in for loading the faces the program found
        found.append(lfw_files.resolve_source(data.path, search_dirs))
        raise Resolved

    monkeypatch.setattr(lfw_files, "load_faces", resolve_only)
    archive = write_archive(lfw_tree, current / "lfw-deepfunneled.tgz")
    with pytest.raises(Resolved):
        vqvae_face_main.run(vqvae_face_main.parse_args(["--out", str(tmp_path / "out"), "--eval"]))
    shutil.copytree(lfw_tree, beside / "lfw-deepfunneled")
    with pytest.raises(Resolved):
        vqvae_face_main.run(vqvae_face_main.parse_args(["--out", str(tmp_path / "out"), "--eval"]))
    assert found == [archive, beside / "lfw-deepfunneled"], "the current folder's, then the script's (searched first)"


def test_evaluation_takes_the_data_a_run_was_trained_on_from_its_config(tmp_path, caplog):
    """`--eval` (no training) with no data.path and no LFW folder beside the script reads the runs' own data,
    recorded in their config.json; training, or a data.path given, keeps what the config says."""
    caplog.set_level(logging.INFO)
    from vqvae_faces.config import load_config
    from vqvae_faces.run_folder import RunPaths

    paths = RunPaths.for_run(tmp_path / "out", "prior")
    paths.checkpoints.mkdir(parents=True)
    paths.resolved_config.write_text(json.dumps({"data": {"path": "faces.tgz", "image_size": 64}}))
    nowhere = [tmp_path / "empty"]
    evaluating = load_config(None, ["enable_training=false"])
    found = vqvae_face_main.with_recorded_data(evaluating, ["prior"], tmp_path / "out", nowhere)
    assert found.data.path == "faces.tgz" and "from the trained run's config.json: faces.tgz" in caplog.text
    training = load_config(None, [])
    assert vqvae_face_main.with_recorded_data(training, ["prior"], tmp_path / "out", nowhere).data.path is None
    given = load_config(None, ["enable_training=false", 'data.path="mine.tgz"'])
    assert vqvae_face_main.with_recorded_data(given, ["prior"], tmp_path / "out", nowhere).data.path == "mine.tgz"
    assert vqvae_face_main.with_recorded_data(evaluating, ["prior"], tmp_path / "new", nowhere).data.path is None


def test_the_reconstruction_grid_has_no_row_for_a_prior():
    """A prior's reconstructions are its VQ-VAE's: comparison.png shows them once."""
    from vqvae_faces.evaluation import EvaluationResult

    images = np.zeros((3, 8, 8, 1), np.uint8)
    results = {
        name: EvaluationResult(metrics, {}, np.full((3, 8, 8, 1), value, np.uint8))
        for name, metrics, value in [("vq", {"model": "VQVAE"}, 1), ("pr", {"tokens_from": "vq"}, 1), ("vae", {}, 2)]
    }
    rows, labels = compare.reconstruction_rows(images, results, {})
    assert labels == ["original", "vq", "vae"] and [row[0, 0, 0, 0] for row in rows] == [0, 1, 2]


def test_a_flat_zip_of_photos_trains_and_evaluates_with_the_same_command(tmp_path, caplog):
    """Training on a flat archive (no identities: one per file) end to end: the split is by file, saved with the
    names as given, and the run evaluates on its test files."""
    from conftest import face_image

    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as archive:
        for index in range(30):
            picture = io.BytesIO()
            Image.fromarray(face_image(index)).save(picture, format="JPEG", quality=90)
            archive.writestr(f"my_photos/{index:06d}.jpg", picture.getvalue())
    overrides = [item for setting in TINY_RUN for item in ("--set", setting)]
    args = ["--out", str(tmp_path / "out"), "--data", str(tmp_path / "photos.zip"), "--run", "vqvae", *overrides]
    assert vqvae_face_main.main(args) == 0
    assert "identities unknown (one folder of images)" in caplog.text
    split = json.loads((tmp_path / "out" / "checkpoints" / "vqvae" / "split.json").read_text())
    names = split["train"] + split["val"] + split["test"]
    assert sorted(names) == [f"my_photos/{index:06d}.jpg" for index in range(30)] and split["test"]
    metrics = json.loads((tmp_path / "out" / "images_saved" / "vqvae" / "metrics.json").read_text())
    assert metrics["num_test_images"] == len(split["test"]) and "one identity per file" in metrics["dataset"]


def test_a_rate_aware_vqvae_trains_without_annealing_and_evaluates(tmp_path, caplog):
    """`rate_lambda` reaches the quantizer, is kept in the checkpoint (so --eval accepts the run and a run of
    another rate_lambda is refused), and turns the evenness annealing off."""
    caplog.set_level(logging.INFO)
    overrides = [item for setting in [*TINY_RUN, "rate_lambda=0.5"] for item in ("--set", setting)]
    args = ["--out", str(tmp_path), "--data", "bundled", "--run", "vqvae", *overrides]
    assert vqvae_face_main.main(args) == 0
    assert "annealing off: with rate_lambda=0.5" in caplog.text
    model = keras.saving.load_model(tmp_path / "checkpoints" / "vqvae" / "best.keras", safe_mode=True)
    assert model.quantizer.rate_lambda == 0.5 and model.quantizer.rate_unit.numpy() > 0
    assert vqvae_face_main.main([*args, "--eval"]) == 0
    assert vqvae_face_main.main([*args, "--eval", "--set", "rate_lambda=0"]) == 2
    assert "rate_lambda: checkpoint 0.5, config 0" in caplog.records[-1].getMessage()
