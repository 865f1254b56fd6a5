"""Hostile or broken input data: memory bombs, every Pillow decoder, mutated images, broken caches."""

import io
import logging
import os
import tarfile
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
from conftest import PEOPLE, face_image, write_lfw_tree
from PIL import EpsImagePlugin, Image

from vqvae_faces import lfw_files
from vqvae_faces.config import DataConfig


def settings(path=None, **kwargs):
    return DataConfig(path=str(path) if path else None, **kwargs)


def test_an_oversized_archive_member_is_skipped_before_it_is_read(tmp_path):
    """A 64 MB member of zeros (64 KB in the .tgz) must not be read into memory."""
    tree = write_lfw_tree(tmp_path / "src", people=PEOPLE[:3], per_person=2)
    archive = tmp_path / "bomb.tgz"
    with tarfile.open(archive, "w:gz") as handle:
        handle.add(tree, arcname=tree.name)
        member = tarfile.TarInfo(f"{tree.name}/{PEOPLE[0]}/{PEOPLE[0]}_0099.jpg")
        member.size = 64 * 1024 * 1024
        handle.addfile(member, io.BytesIO(bytes(member.size)))
    assert archive.stat().st_size < 2 * 1024 * 1024
    tracemalloc.start()
    faces = lfw_files.load_faces(settings(archive, image_size=16, max_file_bytes=1_000_000), tmp_path / "c", [])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert faces.skipped["larger than max_file_bytes=1000000"] == 1
    assert len(faces) == 6
    assert peak < 16 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB: the member was read"


def test_an_oversized_file_in_a_folder_is_skipped_before_it_is_read(tmp_path, monkeypatch):
    tree = write_lfw_tree(tmp_path / "src", people=PEOPLE[:3], per_person=2)
    big = tree / PEOPLE[0] / f"{PEOPLE[0]}_0099.jpg"
    with open(big, "wb") as handle:
        handle.truncate(8 * 1024 * 1024)  # sparse: 8 MB of zeros that take no disk space
    reads = []
    real_read_bytes = type(big).read_bytes
    monkeypatch.setattr(type(big), "read_bytes", lambda path: reads.append(path.name) or real_read_bytes(path))
    faces = lfw_files.load_faces(settings(tree, image_size=16, max_file_bytes=100_000), tmp_path / "c", [])
    assert faces.skipped["larger than max_file_bytes=100000"] == 1
    assert big.name not in reads and len(faces) == 6


def test_decodes_in_flight_are_bounded(monkeypatch):
    """Files are read at most a fixed window ahead of the decoded results, whatever the source's size."""
    produced, consumed, ahead = [0], [0], []
    png = io.BytesIO()
    Image.fromarray(face_image(1)).save(png, format="PNG")

    def members():
        for i in range(300):
            produced[0] += 1
            ahead.append(produced[0] - consumed[0])
            yield f"p{i}/p{i}_0001.png", png.getvalue()

    real_decode = lfw_files.decode_face

    def decode(data, config, detector):
        result = real_decode(data, config, detector)
        consumed[0] += 1
        return result

    monkeypatch.setattr(lfw_files, "decode_face", decode)
    names, faces = lfw_files._decode_all(members(), settings(image_size=16), {})
    assert len(faces) == 300
    workers = min(8, os.cpu_count() or 1)
    assert max(ahead) <= workers * lfw_files.DECODES_IN_FLIGHT_PER_WORKER + workers


def test_only_the_listed_image_formats_are_opened(monkeypatch):
    """An EPS file with a plausible bounding box never reaches Ghostscript."""
    calls = []
    monkeypatch.setattr(
        EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(OSError)
    )
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs", raising=False)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 250 250\nnewpath 0 0 moveto 250 250 lineto stroke\nshowpage\n"
    assert lfw_files.decode_face(eps, settings(image_size=16)) == "not a readable image"
    assert calls == []
    for name in ("TIFF", "EPS", "PSD", "ICO"):
        assert name not in lfw_files.IMAGE_FORMATS


def mutations(data: bytes, rng: np.random.Generator, count: int):
    """Bit flips, truncations, spliced headers and byte runs of one valid file."""
    for _ in range(count):
        kind = rng.integers(4)
        buffer = bytearray(data)
        if kind == 0:
            for position in rng.integers(0, len(buffer), rng.integers(1, 9)):
                buffer[position] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            buffer = buffer[: int(rng.integers(1, len(buffer)))]
        elif kind == 2:
            start = int(rng.integers(0, min(64, len(buffer))))
            buffer[start : start + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        else:
            position = int(rng.integers(0, len(buffer)))
            buffer[position:position] = bytes([int(rng.integers(256))]) * int(rng.integers(1, 64))
        yield bytes(buffer)


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "GIF"])
def test_mutated_images_never_crash_hang_or_slip_in_at_the_wrong_size(image_format):
    picture = io.BytesIO()
    Image.fromarray(face_image(7)).save(picture, format=image_format)
    config = settings(image_size=16)
    rng = np.random.default_rng(2026)
    outcomes = {"decoded": 0, "skipped": 0}
    started = time.monotonic()
    for data in mutations(picture.getvalue(), rng, 150):
        result = lfw_files.decode_face(data, config)
        if isinstance(result, str):
            outcomes["skipped"] += 1
        else:
            assert result.shape in ((16, 16, 3), (16, 16, 1)) and result.dtype == np.uint8
            outcomes["decoded"] += 1
    assert time.monotonic() - started < 60, "a mutated file made the decoder hang"
    assert outcomes["skipped"] > 0, "the mutations must reach the decoder's error paths"


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_a_broken_data_cache_is_rebuilt(tmp_path, caplog, damage):
    tree = write_lfw_tree(tmp_path / "src", people=PEOPLE[:3], per_person=2)
    first = lfw_files.load_faces(settings(tree, image_size=16), tmp_path / "cache", [])
    (cache,) = (tmp_path / "cache").glob("faces-*.npz")
    data = cache.read_bytes()
    cache.write_bytes(
        {"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"PK\x03\x04" + bytes(100)}[damage]
    )
    caplog.set_level(logging.WARNING)
    again = lfw_files.load_faces(settings(tree, image_size=16), tmp_path / "cache", [])
    assert "is unreadable" in caplog.text and "rebuilding it" in caplog.text
    np.testing.assert_array_equal(again.images, first.images)
    with zipfile.ZipFile(cache) as rebuilt:
        assert "images.npy" in rebuilt.namelist()
