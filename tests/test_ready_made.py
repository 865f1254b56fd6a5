"""The ready-made models (`vqvae_faces/models/`): they load in safe mode, stay small, and `--encode` / `--decode`
use them from a fresh `--out` with no training."""

import json
import logging

import keras
import numpy as np
from conftest import face_image
from PIL import Image

import vqvae_face_main
from vqvae_faces import lfw_files
from vqvae_faces.config import DataConfig
from vqvae_faces.integer_decoder import IntegerDecoder
from vqvae_faces.ready_made import READY_MADE
from vqvae_faces.vqf_format import HEADER_BYTES

RUNS = {"vqvae": "VQVAE", "prior": "CausalTransformer"}


def test_the_ready_made_models_load_in_safe_mode_small_and_without_optimizer_state():
    import vqvae_faces.model_settings  # noqa: F401  (registers every class)

    files = {run: READY_MADE / "checkpoints" / run / "best.keras" for run in RUNS}
    assert sum(path.stat().st_size for path in files.values()) < 10e6
    for run, path in files.items():
        model = keras.saving.load_model(path, safe_mode=True)
        assert type(model).__name__ == RUNS[run] and getattr(model, "optimizer", None) is None
        assert json.loads((path.parent / "config.json").read_text())["run_name"] == run
    assert (READY_MADE / "README.md").is_file()


def test_a_fresh_out_encodes_and_decodes_a_photo_with_the_ready_made_models(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    photo = tmp_path / "me.png"
    Image.fromarray(face_image(5)).save(photo)
    out = tmp_path / "empty"
    assert vqvae_face_main.main(["--out", str(out), "--encode", str(photo)]) == 0
    assert f"using the ready-made models in {READY_MADE}" in caplog.text
    data = (tmp_path / "me.vqf").read_bytes()
    assert data[0] == 0xF3 and len(data) < HEADER_BYTES + 9 * 256 // 8  # fewer bits than the raw grid
    decode = ["--out", str(out), "--decode", str(tmp_path / "me.vqf"), "--to", str(tmp_path / "faces")]
    assert vqvae_face_main.main(decode) == 0
    decoded = np.asarray(Image.open(tmp_path / "faces" / "me.png"))
    vqvae = keras.saving.load_model(READY_MADE / "checkpoints" / "vqvae" / "best.keras", safe_mode=True)
    face, _ = lfw_files.decode_photo(photo.read_bytes(), DataConfig(image_size=64), 3)
    tokens = vqvae.encode_to_tokens(face[None].astype(np.float32) / 255.0).numpy()
    np.testing.assert_array_equal(decoded, IntegerDecoder(vqvae).pixels(tokens)[0])  # the nearest codes, decoded
    mse = ((decoded.astype(float) - face) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) > 24  # a face model's reconstruction, not noise
    assert not out.exists() and not list(READY_MADE.rglob("train.lock"))  # nothing written but the files asked for


def test_models_that_hold_no_trained_runs_are_refused_in_one_line(tmp_path, caplog):
    photo = tmp_path / "me.png"
    Image.fromarray(face_image(5)).save(photo)
    assert vqvae_face_main.main(["--encode", str(photo), "--models", str(tmp_path / "none")]) == 2
    message = caplog.records[-1].getMessage()
    assert message.startswith(f"--models {tmp_path / 'none'} holds no trained runs") and "Traceback" not in caplog.text
    assert not (tmp_path / "me.vqf").exists()


def test_a_fresh_out_samples_faces_from_the_ready_made_prior(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "empty"
    assert vqvae_face_main.main(["--out", str(out), "--sample", "2"]) == 0
    assert f"using the ready-made models in {READY_MADE}" in caplog.text
    folder = out / "images_saved" / "prior"
    with np.load(folder / "samples.npz", allow_pickle=False) as samples:
        tokens = samples["tokens"]
    assert tokens.shape == (2, 16, 16) and 0 <= tokens.min() and tokens.max() < 512 and len(np.unique(tokens)) > 20
    assert (folder / "samples.png").is_file() and not (folder / "nearest_training_faces.png").exists()
    assert not (out / "checkpoints").exists()  # nothing trained, nothing cached
