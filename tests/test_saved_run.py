"""A finished run and `.vqf` files written by an earlier version of the code (tests/data/saved_run, see its
README) still load, evaluate to the same figures and decode to the same faces."""

import json
import math
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import TINY_RUN, face_image
from PIL import Image

import vqvae_face_main

SAVED = Path(__file__).resolve().parent / "data" / "saved_run"
RUN_SETTINGS = TINY_RUN + ["data.image_size=32", "epochs=12"]
RUN_CLASSES = {"vqvae": "VQVAE", "vae": "VAE", "prior": "CausalTransformer"}
CODED = ["face0.vqf", "face1.vqf", "face2.vqf", "all.vqfs"]


def main(out, *args):
    overrides = [item for setting in RUN_SETTINGS for item in ("--set", setting)]
    return vqvae_face_main.main(["--out", str(out), "--data", "bundled", *overrides, *args])


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def same_instruction_sets() -> bool:
    """Whether this CPU has the instruction sets of the one that wrote the files (format version 1 files
    hold probabilities computed in float32, exactly reproducible only there). AMX and AVX-512 FP16 count:
    oneDNN picks other float32 kernels where it finds them."""
    written = set(json.loads((SAVED / "expected" / "machine.json").read_text())["cpu_flags"])
    checked = {"avx2", "avx512_bf16", "avx512_vnni", "avx512f", "fma", "sse4_2", "amx_tile", "avx512_fp16"}
    return written == cpu_flags() & checked


@pytest.fixture
def saved(tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(SAVED, copy)
    return copy


@pytest.mark.parametrize("run", sorted(RUN_CLASSES))
def test_each_saved_model_loads_in_safe_mode_as_its_class(run):
    import vqvae_faces.model_settings  # noqa: F401  (registers every class the runs hold)

    model = keras.saving.load_model(SAVED / "checkpoints" / run / "best.keras", safe_mode=True)
    assert type(model).__name__ == RUN_CLASSES[run]


def test_the_saved_runs_evaluate_to_the_figures_they_were_saved_with(saved):
    assert main(saved, "--eval") == 0
    for run in RUN_CLASSES:
        expected = json.loads((SAVED / "expected" / f"{run}-metrics.json").read_text())
        measured = json.loads((saved / "images_saved" / run / "metrics.json").read_text())
        for key, value in expected.items():
            if key.endswith("per_second") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            assert math.isclose(measured[key], value, rel_tol=1e-5, abs_tol=1e-7), (run, key, measured[key], value)
        assert ("test_bits_per_token" if run == "prior" else "psnr") in expected


def decode(saved, tmp_path, folder: str) -> tuple[int, Path]:
    """--decode of the four files in `folder` of the saved run: its exit status and where the PNGs are."""
    faces = tmp_path / folder
    return main(saved, "--decode", *[str(saved / folder / name) for name in CODED], "--to", str(faces)), faces


def assert_same_faces(faces: Path) -> None:
    for picture in sorted((SAVED / "decoded").iterdir()):
        np.testing.assert_array_equal(np.asarray(Image.open(faces / picture.name)), np.asarray(Image.open(picture)))


def test_format_1_files_decode_to_the_same_faces_on_the_writer_s_cpu_and_elsewhere_are_refused(saved, tmp_path, caplog):
    """Format 1's float32 probabilities repeat exactly on the writer's instruction sets: the same faces there.
    Elsewhere the tokens' checksum tells: the same faces where the arithmetic happens to agree, else one line
    and exit 2, never other faces."""
    code, faces = decode(saved, tmp_path, "vqf")
    if code == 0:
        assert_same_faces(faces)
    else:
        assert not same_instruction_sets(), caplog.text[-2000:]
        assert code == 2 and "is format version 1" in caplog.text and "Decode it where it was written" in caplog.text
        assert not faces.exists() or not any(faces.iterdir()), "nothing written"


def test_format_2_files_decode_to_the_same_faces_on_any_computer(saved, tmp_path):
    """The same photos written in format 2 (vqf2/) carry the same tokens and decode to the same pixels, here and
    on any other computer (integer arithmetic throughout)."""
    code, faces = decode(saved, tmp_path, "vqf2")
    assert code == 0
    assert_same_faces(faces)


@pytest.mark.skipif(not same_instruction_sets(), reason="the encoder's float32 nearest codes may differ elsewhere")
def test_photos_encode_to_the_same_files(saved, tmp_path):
    photos = []
    for index in range(3):
        photos.append(tmp_path / f"face{index}.png")
        Image.fromarray(face_image(100 + index)).save(photos[-1])
    # without the run's settings: photos are resized to the size the VQ-VAE was trained on, not the config's 64
    again = tmp_path / "again"
    assert vqvae_face_main.main(["--out", str(saved), "--encode", *map(str, photos), "--to", str(again)]) == 0
    assert main(saved, "--encode", *map(str, photos), "--into", str(again / "all.vqfs"), "--rate-lambda", "1") == 0
    assert (again / "all.vqfs").read_bytes() == (SAVED / "vqf2" / "all.vqfs").read_bytes()
    for name in CODED[:-1]:  # format 3: format 2's payload behind a 5-byte header
        data, old = (again / name).read_bytes(), (SAVED / "vqf2" / name).read_bytes()
        assert data[0] == 0xF3 and data[3:5] == old[9:11] and data[5:] == old[11:], name
