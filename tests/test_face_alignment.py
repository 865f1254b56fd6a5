"""Faces from any photo (`face_alignment`): the warp against a NumPy bilinear oracle, the landmark fit against a
known transform, and the detector path end to end on a real photo (scikit-image's astronaut) moved, turned,
greyed, made transparent, shrunk and hidden, through `decode_photo`, training decode and `--encode`."""

import io
import logging

import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

import vqvae_face_main
from vqvae_faces import lfw_files
from vqvae_faces.config import DataConfig, load_config
from vqvae_faces.errors import ConfigError, DataError
from vqvae_faces.face_alignment import LFW_LANDMARKS, DetectorOnDemand, aligned_frame, frame_transform

SETTINGS = DataConfig(image_size=64)


def encoded(picture: Image.Image, image_format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255.0**2 / max(np.mean((a.astype(np.float64) - b) ** 2), 1e-10))


def similarity(scale: float, degrees: float, shift: tuple[float, float]) -> np.ndarray:
    angle = np.deg2rad(degrees)
    return np.array(
        [
            [scale * np.cos(angle), -scale * np.sin(angle), shift[0]],
            [scale * np.sin(angle), scale * np.cos(angle), shift[1]],
            [0, 0, 1],
        ]
    )


def bilinear(image: np.ndarray, x: float, y: float) -> np.ndarray:
    """NumPy oracle: `image` (H, W, C) at pixel-centre coordinates (x, y)."""
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    fx, fy = x - x0, y - y0
    top = (1 - fx) * image[y0, x0] + fx * image[y0, x0 + 1]
    bottom = (1 - fx) * image[y0 + 1, x0] + fx * image[y0 + 1, x0 + 1]
    return (1 - fy) * top + fy * bottom


@pytest.fixture(scope="module")
def detector():
    return DetectorOnDemand()


@pytest.fixture(scope="module")
def astronaut():
    return Image.fromarray(skimage_data.astronaut())  # 512x512, one face, upper centre


def test_the_landmark_fit_recovers_a_known_similarity_transform():
    known = similarity(1.7, 12.0, (40.0, -8.0))
    landmarks = (np.c_[LFW_LANDMARKS, np.ones(5)] @ known.T)[:, :2]
    np.testing.assert_allclose(frame_transform(landmarks, 250).params, known, atol=1e-9)
    halved = frame_transform(landmarks / 2, 125).params  # half the photo, half the frame: the same scale
    np.testing.assert_allclose(halved[:2], np.c_[known[:2, :2], known[:2, 2] / 2], atol=1e-9)
    with pytest.raises(DataError, match="degenerate"):
        frame_transform(np.zeros((5, 2)), 250)


def test_the_warp_samples_the_photo_where_the_transform_says():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (300, 400, 3)).astype(np.uint8)
    same = aligned_frame(Image.fromarray(photo[:250, :250]), np.eye(3), 250)
    identity = np.asarray(same).astype(int) - photo[:250, :250]  # the template's own landmarks
    assert np.abs(identity).max() <= 1  # Pillow's bilinear rounds down exact samples at times
    known = similarity(0.8, -9.0, (70.0, 30.0))
    frame = np.asarray(aligned_frame(Image.fromarray(photo), known, 250)).astype(np.float64)
    for u, v in [(10, 20), (125, 125), (200, 31), (240, 240)]:
        x, y = (known @ [u, v, 1])[:2]
        np.testing.assert_allclose(frame[v, u], bilinear(photo.astype(np.float64), x, y), atol=1.01)


def test_a_large_photo_is_reduced_before_the_warp_not_aliased():
    stripes = np.zeros((2000, 2000, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: a sampler that skips pixels sees all black or all white
    known = similarity(6.0, 0.0, (100.0, 100.0))
    frame = np.asarray(aligned_frame(Image.fromarray(stripes), known, 250)).astype(np.float64)
    assert abs(frame.mean() - 127.5) < 3 and frame.std() < 40


def test_the_astronaut_is_found_and_framed_as_an_lfw_face(detector, astronaut):
    faces = detector().faces(np.asarray(astronaut))
    assert len(faces) == 1 and faces[0].confidence > 0.9
    left_eye, right_eye, nose, mouth_left, mouth_right = faces[0].landmarks
    assert left_eye[0] < nose[0] < right_eye[0] and max(left_eye[1], right_eye[1]) < nose[1] < mouth_left[1]
    frame, notes = lfw_files.decode_photo(encoded(astronaut), SETTINGS, 3, detector)
    assert frame.shape == (64, 64, 3) and notes == []
    # the eyes land where the template puts them in the 64x64 crop (border 60 of 250, 130 px resized to 64)
    transform = frame_transform(faces[0].landmarks, 250)
    crop_eyes = (transform.inverse(faces[0].landmarks[:2]) - 60) * 64 / 130
    np.testing.assert_allclose(crop_eyes, (LFW_LANDMARKS[:2] - 60) * 64 / 130, atol=3.0)


def test_moved_turned_grey_and_transparent_photos_give_the_same_face(detector, astronaut):
    upright, _ = lfw_files.decode_photo(encoded(astronaut), SETTINGS, 3, detector)
    scene = Image.new("RGB", (1200, 800), (90, 120, 90))
    scene.paste(astronaut.resize((300, 300), Image.LANCZOS), (800, 100))  # off-centre in a larger scene
    turned = astronaut.rotate(45, resample=Image.BILINEAR, expand=True)  # MTCNN alone puts its landmarks 8 degrees off
    transparent = np.asarray(astronaut.convert("RGBA")).copy()
    transparent[:, :60, 3] = 0  # see-through at the left edge, outside the face's crop
    for picture, image_format in [(scene, "JPEG"), (turned, "PNG"), (Image.fromarray(transparent), "PNG")]:
        face, notes = lfw_files.decode_photo(encoded(picture, image_format), SETTINGS, 3, detector)
        assert psnr(face, upright) > 25 and notes == []
    grey, _ = lfw_files.decode_photo(encoded(astronaut.convert("L")), SETTINGS, 1, detector)
    upright_grey = np.asarray(Image.fromarray(upright).convert("L"))[..., None]
    assert grey.shape == (64, 64, 1) and psnr(grey, upright_grey) > 24  # landmarks found without colour


def test_exif_orientation_is_applied_before_the_face_is_looked_for(detector, astronaut):
    upright, _ = lfw_files.decode_photo(encoded(astronaut), SETTINGS, 3, detector)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter left: viewers turn it right
    stored = encoded(astronaut.rotate(90, expand=True), "JPEG", quality=95, exif=exif)
    face, _ = lfw_files.decode_photo(stored, SETTINGS, 3, detector)
    assert psnr(face, upright) > 28


def test_small_faces_warn_and_faceless_photos_are_refused(detector, astronaut):
    small = Image.new("RGB", (400, 300), (200, 200, 200))
    small.paste(astronaut.resize((100, 100), Image.LANCZOS), (150, 100))
    _, notes = lfw_files.decode_photo(encoded(small), SETTINGS, 3, detector)
    assert len(notes) == 1 and notes[0].startswith("a small face, upscaled")
    edge = astronaut.crop((190, 0, 512, 512))  # the face near the left edge: its crop reaches past it
    _, notes = lfw_files.decode_photo(encoded(edge), SETTINGS, 3, detector)
    assert notes == ["the face's crop reaches past the photo's edge: that part is black"]
    for faceless in [Image.new("RGB", (300, 200), (40, 80, 120)), astronaut.rotate(180)]:
        with pytest.raises(DataError, match="^no face found"):
            lfw_files.decode_photo(encoded(faceless), SETTINGS, 3, detector)


def test_face_alignment_decides_which_photos_meet_the_detector(detector, astronaut):
    lfw_style = astronaut.resize((250, 250))
    fixed, _ = lfw_files.decode_photo(encoded(lfw_style), SETTINGS, 3, detector)
    expected = np.asarray(lfw_style.crop((60, 60, 190, 190)).resize((64, 64), Image.BILINEAR))
    np.testing.assert_array_equal(fixed, expected)  # "auto": a 250x250 square is an LFW crop
    detected, _ = lfw_files.decode_photo(encoded(lfw_style), DataConfig(image_size=64, face_alignment="detect"), 3)
    assert not np.array_equal(detected, fixed)
    _, notes = lfw_files.decode_photo(encoded(astronaut), DataConfig(image_size=64, face_alignment="lfw"), 3)
    assert "not a 250x250 LFW-style crop" in notes[0]
    training = lfw_files.decode_face(encoded(astronaut), SETTINGS, detector)  # training data meets it too
    assert training.shape == (64, 64, 3)
    assert lfw_files.decode_face(encoded(astronaut), DataConfig(face_alignment="lfw")) == "not 250x250 pixels"
    with pytest.raises(ConfigError, match="face_alignment.*'eyes'"):
        load_config(None, ['data.face_alignment="eyes"'])


def test_encode_refuses_a_faceless_photo_in_one_line_and_writes_nothing(tmp_path, caplog, astronaut):
    caplog.set_level(logging.INFO)
    Image.new("RGB", (300, 200), (40, 80, 120)).save(tmp_path / "wall.png")
    astronaut.save(tmp_path / "astronaut.png")
    out = ["--out", str(tmp_path / "empty")]
    assert vqvae_face_main.main([*out, "--encode", str(tmp_path / "astronaut.png"), str(tmp_path / "wall.png")]) == 2
    assert caplog.records[-1].getMessage().startswith(f"{tmp_path / 'wall.png'}: no face found")
    assert not list(tmp_path.glob("*.vqf")) and "Traceback" not in caplog.text
    assert vqvae_face_main.main([*out, "--encode", str(tmp_path / "astronaut.png"), "--preview"]) == 0
    assert (tmp_path / "astronaut.vqf").is_file()
    preview = np.asarray(Image.open(tmp_path / "astronaut.preview.png"))
    assert preview.shape[0] > 100 and preview.std() > 20  # a figure of two faces, not a blank page
    assert vqvae_face_main.main([*out, "--encode", str(tmp_path / "astronaut.png"), "--preview"]) == 2
    assert "already exist: pass --overwrite" in caplog.records[-1].getMessage()
    assert vqvae_face_main.main([*out, "--decode", str(tmp_path / "astronaut.vqf"), "--preview"]) == 2
    assert caplog.records[-1].getMessage() == "--preview shows what --encode sends: pass it with --encode PHOTO."
