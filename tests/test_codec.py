"""The .vqf codec: exact round trips (here, in another process, with other batches and threads),
a clear message for every kind of bad file, and the rate term's effect."""

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib

import keras
import numpy as np
import pytest
from conftest import ROOT, TWO_THREADS, face_image
from PIL import Image

from vqvae_class_keras import VQVAE
from vqvae_faces.codec import CODEC_BATCH, FaceCodec
from vqvae_faces.model_settings import load_model
from vqvae_faces.token_prior import CausalTransformer
from vqvae_faces.token_search import search_tokens
from vqvae_faces.vqf_format import CONTAINER_HEADER_BYTES, HEADER_BYTES, CodecError, Fingerprints, token_checksum

K, GRID = 16, (4, 4)
TINY = dict(encoder_filters=[8, 16], decoder_filters=[16, 8], num_residual_blocks=0, residual_hidden_channels=8)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("codec")
    keras.utils.set_random_seed(3)
    vqvae = VQVAE(image_channels=3, embedding_dim=4, num_embeddings=K, seed=1, ssim_weight=0.0, **TINY)
    vqvae.compile(optimizer="adam")
    vqvae.build((None, 16, 16, 3))
    vqvae.save(folder / "vqvae.keras")
    prior = CausalTransformer(K, GRID, width=16, num_heads=2, num_layers=1)
    prior.compile(optimizer="adam")
    prior(np.zeros((1, *GRID), np.int32))
    prior.save(folder / "prior.keras")
    return folder


def make_codec(model_files, fingerprints=Fingerprints(0x1234, 0x5678)):
    return FaceCodec(load_model(model_files / "vqvae.keras"), load_model(model_files / "prior.keras"), fingerprints)


@pytest.fixture(scope="module")
def codec(model_files):
    """One codec of the saved models for the tests that leave its weights alone (it compiles its step once)."""
    return make_codec(model_files)


def faces(count):
    images = [np.asarray(Image.fromarray(face_image(i)).resize((16, 16), Image.BILINEAR)) for i in range(count)]
    return np.stack(images)


def favour_token(prior, token, logit):
    """Give the prior's output layer a bias of `logit` for `token` and 0 for every other token."""
    bias = np.zeros(K, np.float32)
    bias[token] = logit
    prior.head.bias.assign(bias)


def rebuilt(codec):
    """A codec of the same models and settings that reads the prior's weights again (a codec reads them once)."""
    return FaceCodec(codec.vqvae, codec.prior, codec.fingerprints, codec.search_steps, codec.chooser.search_step_size)


def decoded_mse(vqvae, tokens, pixels):
    """Per-face mean squared error (N,) of the decoded tokens against the pixels in [0, 1]."""
    return ((vqvae.decode_tokens(tokens).numpy() - pixels) ** 2).mean(axis=(1, 2, 3))


def test_tokens_round_trip_including_the_first_and_last_symbol_under_skewed_distributions(model_files):
    codec = make_codec(model_files)
    rng = np.random.default_rng(0)
    grids = rng.integers(0, K, (CODEC_BATCH + 3, *GRID)).astype(np.int16)  # a full batch and a partial one
    grids[0], grids[1] = 0, K - 1
    encoded = codec.encode_tokens(grids)
    files, container = encoded.files, encoded.container
    np.testing.assert_array_equal(codec.decode(files, [f"f{i}" for i in range(len(files))]), grids)
    np.testing.assert_array_equal(codec.decode_container(container, "all.vqfs"), grids)
    # A prior almost sure of token 0: the unlikely last symbol still codes, and certain tokens cost almost nothing.
    favour_token(codec.prior, 0, 25.0)
    codec = rebuilt(codec)
    skewed = np.zeros((2, *GRID), np.int16)
    skewed[1, 2, 3] = K - 1
    encoded = codec.encode_tokens(skewed)
    files, container = encoded.files, encoded.container
    np.testing.assert_array_equal(codec.decode(files, ["a", "b"]), skewed)
    np.testing.assert_array_equal(codec.decode_container(container, "all.vqfs"), skewed)
    assert len(files[0]) < len(files[1]) and len(files[0]) <= HEADER_BYTES + 4


def test_grids_longer_than_one_cache_chunk_round_trip(model_files):
    grid = (9, 10)  # 90 positions: a full chunk of cached keys and values (64) and a partial one
    keras.utils.set_random_seed(4)
    prior = CausalTransformer(K, grid, width=16, num_heads=2, num_layers=1)
    prior(np.zeros((1, *grid), np.int32))
    codec = FaceCodec(load_model(model_files / "vqvae.keras"), prior, Fingerprints(1, 2))
    grids = np.random.default_rng(5).integers(0, K, (3, *grid)).astype(np.int16)
    encoded = codec.encode_tokens(grids)
    files, container = encoded.files, encoded.container
    np.testing.assert_array_equal(codec.decode(files, ["a", "b", "c"]), grids)
    np.testing.assert_array_equal(codec.decode_container(container, "all.vqfs"), grids)


def format_2(data: bytes, fingerprints=Fingerprints(0x1234, 0x5678)) -> bytes:
    """The format 2 file (11-byte header) of a format 3 file's tokens: the same payload."""
    return b"VQ\x02" + struct.pack(">HHBB", fingerprints.vqvae, fingerprints.prior, *GRID) + data[3:]


def test_the_header_holds_version_fingerprint_and_checksum_and_the_container_header_the_grid_too(codec):
    grid = np.arange(16, dtype=np.int16).reshape(GRID)
    encoded = codec.encode_tokens(grid[None])
    (data,), container = encoded.files, encoded.container
    checksum = token_checksum(grid)
    both = hashlib.sha256(b"\x12\x34\x56\x78").digest()[:2]
    assert HEADER_BYTES == 5 and data[:HEADER_BYTES] == b"\xf3" + both + bytes([checksum >> 8, checksum & 0xFF])
    crc = zlib.crc32(grid.astype("<i2").tobytes())
    assert container[:CONTAINER_HEADER_BYTES] == b"VS\x02\x12\x34\x56\x78\x04\x04\0\0\0\x01" + crc.to_bytes(4, "big")


def test_a_container_costs_the_code_lengths_and_no_header_per_face(codec):
    """Its payload is within a few words of the summed ideal code lengths, far below the files' summed sizes."""
    images = faces(CODEC_BATCH + 6)
    encoded = codec.encode(images)
    files, container, grids = encoded.files, encoded.container, encoded.grids
    _, bits = codec.choose_tokens(images)
    payload_bits = 8 * (len(container) - CONTAINER_HEADER_BYTES)
    assert bits.sum() <= payload_bits <= bits.sum() + 64
    assert payload_bits < 8 * sum(len(data) - HEADER_BYTES for data in files)
    np.testing.assert_array_equal(codec.decode_container(container, "all.vqfs"), grids)
    alone = codec.encode(images, files=False)  # what --into writes: the same bytes, without the files
    only_files = codec.encode(images, container=False)
    assert alone.container == container and only_files.files == files
    assert not alone.files and not only_files.container
    np.testing.assert_array_equal(alone.grids, grids)
    np.testing.assert_array_equal(only_files.grids, grids)
    np.testing.assert_array_equal(encoded.bits, bits)


def test_images_encode_to_their_nearest_codes_and_decode_to_them(codec):
    images = faces(5)
    encoded = codec.encode(images)
    files, grids = encoded.files, encoded.grids
    nearest = codec.vqvae.encode_to_tokens(images.astype(np.float32) / 255.0).numpy()
    np.testing.assert_array_equal(grids, nearest)
    np.testing.assert_array_equal(codec.decode(files, list("abcde")), nearest)


DECODE_ELSEWHERE = """
import json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from vqvae_faces.codec import FaceCodec
from vqvae_faces.model_settings import load_model
from vqvae_faces.vqf_format import Fingerprints
folder = Path({folder!r})
codec = FaceCodec(load_model(folder / "vqvae.keras"), load_model(folder / "prior.keras"), Fingerprints(0x1234, 0x5678))
names = sorted(folder.glob("*.vqf"), reverse=True)[:{count}]  # other files per batch, in another order
grids = codec.decode([p.read_bytes() for p in names], [str(p) for p in names])
together = codec.decode_container((folder / "all.vqfs").read_bytes(), "all.vqfs")
decoded = {{p.stem: g.tolist() for p, g in zip(names, grids)}}
print(json.dumps({{**decoded, "all": together.tolist(), "pixels": codec.pixels(together).tolist()}}))
"""


ONE_THREAD = {name: "1" for name in TWO_THREADS}
OTHER_THREADS = TWO_THREADS if os.environ.get("TF_NUM_INTRAOP_THREADS") != "2" else ONE_THREAD
# Other computers, as far as one can be simulated: XLA limited to older instruction sets (AVX: no AVX2 or FMA),
# oneDNN off, other thread counts for TensorFlow and for NumPy's BLAS.
ELSEWHERE = {
    "AVX, oneDNN off, other TensorFlow threads": {
        **OTHER_THREADS,
        "XLA_FLAGS": "--xla_cpu_max_isa=AVX",
        "TF_ENABLE_ONEDNN_OPTS": "0",
    },
    "SSE4_2, one BLAS thread": {"XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2", "OPENBLAS_NUM_THREADS": "1"},
}


@pytest.mark.parametrize("elsewhere", sorted(ELSEWHERE))
def test_another_process_on_other_arithmetic_decodes_the_same_tokens(codec, model_files, elsewhere):
    """Encoded here, decoded by a program with other instruction sets, threads and batches: files of nearest
    codes (their probabilities from the full pass) and a container of tokens chosen by the rate term (a
    position at a time), to the same tokens and the same pixels. Format 1's float32 probabilities failed
    exactly this."""
    images = faces(CODEC_BATCH + 5)
    encoded = codec.encode(images)
    files, grids = encoded.files, encoded.grids
    rated = codec.encode(images, rate_lambda=0.3)
    container, chosen = rated.container, rated.grids
    assert (chosen != grids).any(), "the rate term must change some tokens for the container to test that path"
    for index, data in enumerate(files):
        (model_files / f"face{index:03d}.vqf").write_bytes(data)
    (model_files / "all.vqfs").write_bytes(container)
    script = DECODE_ELSEWHERE.format(root=str(ROOT), folder=str(model_files), count=len(files) - 2)
    environment = {**os.environ, **ELSEWHERE[elsewhere]}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=environment
    )
    assert result.returncode == 0, result.stderr[-3000:]
    decoded = json.loads(result.stdout.strip().splitlines()[-1])
    np.testing.assert_array_equal(decoded.pop("all"), chosen)
    np.testing.assert_array_equal(decoded.pop("pixels"), codec.pixels(chosen))
    assert len(decoded) == len(files) - 2
    for stem, grid in decoded.items():
        np.testing.assert_array_equal(grid, grids[int(stem[4:])], err_msg=stem)


def flipped_bit(offset):
    return lambda data: data[:offset] + bytes([data[offset] ^ 1]) + data[offset + 1 :]


def scrambled_after(offset):
    return lambda data: data[:offset] + bytes(b ^ 0x5A for b in data[offset:])


@pytest.mark.parametrize(
    "container, damage, message",
    [
        (False, lambda data: b"PK" + data[2:], "is not a .vqf file"),
        (False, lambda data: b"\xf7" + data[1:], "format version 7; this program reads versions 1, 2 and 3"),
        (False, lambda data: data[:4], "is truncated"),
        (False, lambda data: data[: HEADER_BYTES + 1], "corrupt"),
        (False, scrambled_after(HEADER_BYTES), "corrupt"),
        (False, flipped_bit(4), "do not match the checksum"),
        (False, flipped_bit(1), "other models"),
        (False, lambda data: b"VQ\x07" + format_2(data)[3:], "format version 7; this program reads versions 1, "),
        (False, lambda data: format_2(data)[:8], "is truncated"),
        (False, lambda data: flipped_bit(9)(format_2(data)), "do not match the checksum"),
        (False, lambda data: flipped_bit(4)(format_2(data)), "other models"),
        (False, lambda data: flipped_bit(8)(format_2(data)), "4x5 grid"),
        (True, lambda data: b"VQ" + data[2:], "is not a .vqfs file"),
        (True, lambda data: data[:2] + b"\x03" + data[3:], ".vqfs format version 3; this program reads versions 1"),
        (True, lambda data: data[:12], "is truncated"),
        (True, lambda data: data[: CONTAINER_HEADER_BYTES + 8], "corrupt"),
        (True, scrambled_after(CONTAINER_HEADER_BYTES), "corrupt"),
        (True, flipped_bit(16), "do not match the checksum"),
        (True, lambda data: data[:12] + bytes([data[12] - 1]) + data[13:], "do not match the checksum"),  # a face less
        (True, flipped_bit(6), "other models"),
    ],
)
def test_every_kind_of_bad_file_or_container_gets_its_message(codec, container, damage, message):
    encoded = codec.encode(faces(3))
    files, packed = encoded.files, encoded.container
    name = "all.vqfs" if container else "face.vqf"
    with pytest.raises(CodecError, match=message) as error:
        if container:
            codec.decode_container(damage(packed), name)
        else:
            codec.decode([damage(files[0])], [name])
    assert name in str(error.value)


def test_other_weights_are_refused_naming_both_sets(codec, model_files):
    """Format 3 carries one fingerprint of both models, format 2 one of each; either way the file is refused."""
    files = codec.encode(faces(1)).files
    other = make_codec(model_files, Fingerprints(0x1234, 0x9999, "v.keras", "p.keras"))
    written, mine = codec.fingerprints.pair, other.fingerprints.pair
    assert written != mine
    expected = rf"other models \(fingerprint {written:04x}\) than these \(VQ-VAE 1234 v.keras, prior 9999 p.keras: "
    with pytest.raises(CodecError, match=expected + f"fingerprint {mine:04x}"):
        other.decode(files, ["face.vqf"])
    with pytest.raises(CodecError, match=r"VQ-VAE 1234, prior 5678\) than these \(VQ-VAE 1234 v.keras, prior 9999"):
        other.decode([format_2(files[0])], ["face.vqf"])


def test_format_2_files_of_the_same_tokens_still_decode(codec):
    """Format 2 (11-byte header) and format 3 (5 bytes) share the payload and its integer arithmetic."""
    encoded = codec.encode(faces(CODEC_BATCH + 2))
    files = [format_2(data) for data in encoded.files]
    assert all(len(old) == len(new) + 6 for old, new in zip(files, encoded.files))
    np.testing.assert_array_equal(codec.decode(files, [f"f{i}" for i in range(len(files))]), encoded.grids)
    mixed = [data if index % 2 else files[index] for index, data in enumerate(encoded.files)]
    np.testing.assert_array_equal(codec.decode(mixed, [f"f{i}" for i in range(len(files))]), encoded.grids)


def test_the_rate_term_moves_tokens_to_shorter_codes(model_files):
    """A prior that prefers token 3: the larger rate_lambda, the fewer bits; at a huge one every token is 3."""
    codec = make_codec(model_files)
    favour_token(codec.prior, 3, 4.0)
    codec = rebuilt(codec)
    images = faces(6)
    bits, grids = [], []
    for rate_lambda in (0.0, 0.1, 0.3, 1e6):
        chosen, lengths = codec.choose_tokens(images, rate_lambda)
        encoded = codec.encode(images, rate_lambda)
        files, coded = encoded.files, encoded.grids
        np.testing.assert_array_equal(coded, chosen)
        np.testing.assert_array_equal(codec.decode(files, list("abcdef")), chosen)
        bits.append(lengths.mean())
        grids.append(chosen)
    nearest = codec.vqvae.encode_to_tokens(images.astype(np.float32) / 255.0).numpy()
    np.testing.assert_array_equal(grids[0], nearest)
    assert bits[0] > bits[1] > bits[2] > bits[3] and (grids[3] == 3).all()


def test_searched_tokens_are_coded_and_the_rate_term_moves_away_from_them(model_files):
    """With search_steps the codec codes the tokens token_search.search_tokens chooses (no worse faces than the
    nearest codes); a tiny rate_lambda keeps them, since their own codes are at distance 0, and a huge
    one gives the prior's favourite token everywhere. Files decode to exactly the coded tokens."""
    steps, step_size = 8, 0.3
    codec = FaceCodec(
        *(load_model(model_files / name) for name in ("vqvae.keras", "prior.keras")),
        Fingerprints(1, 2),
        search_steps=steps,
        search_step_size=step_size,
    )
    images = faces(6)
    pixels = images.astype(np.float32) / 255.0
    searched = search_tokens(codec.vqvae, pixels, steps, step_size).numpy()
    nearest = codec.vqvae.encode_to_tokens(pixels).numpy()
    assert (searched != nearest).any(), "the search must change some tokens for this test to mean anything"

    encoded = codec.encode(images)
    files, grids = encoded.files, encoded.grids
    np.testing.assert_array_equal(grids, searched)
    np.testing.assert_array_equal(codec.decode(files, list("abcdef")), searched)
    assert (decoded_mse(codec.vqvae, grids, pixels) <= decoded_mse(codec.vqvae, nearest, pixels)).all()
    favour_token(codec.prior, 3, 4.0)
    codec = rebuilt(codec)
    np.testing.assert_array_equal(codec.choose_tokens(images, 1e-9)[0], searched)
    encoded = codec.encode(images, 1e6)
    files, grids = encoded.files, encoded.grids
    assert (grids == 3).all()
    np.testing.assert_array_equal(codec.decode(files, list("abcdef")), grids)
    with pytest.raises(ValueError, match="search_step_size=0"):
        FaceCodec(codec.vqvae, codec.prior, Fingerprints(1, 2), search_steps=5)


def test_with_search_steps_the_rate_term_is_in_the_search_and_its_tokens_are_coded(model_files):
    """With search_steps and rate_lambda > 0 the codec codes the tokens of the search whose cost has the
    prior's code lengths in it; each face's cost (squared error in units of its nearest codes' error / 16
    positions, + rate_lambda x bits under the prior, computed here in NumPy from the prior's full pass)
    is at most its nearest codes' cost, and the rate term gives fewer bits than the search without it."""
    steps, step_size, rate_lambda = 8, 0.3, 0.5
    vqvae, prior = (load_model(model_files / name) for name in ("vqvae.keras", "prior.keras"))
    favour_token(prior, 3, 2.0)
    codec = FaceCodec(vqvae, prior, Fingerprints(1, 2), search_steps=steps, search_step_size=step_size)
    images = faces(6)
    pixels = images.astype(np.float32) / 255.0
    encoded = codec.encode(images, rate_lambda)
    files, grids = encoded.files, encoded.grids
    np.testing.assert_array_equal(codec.decode(files, list("abcdef")), grids)
    expected = search_tokens(vqvae, pixels, steps, step_size, prior.code_lengths, rate_lambda).numpy()
    np.testing.assert_array_equal(grids, expected)

    def bits(tokens):
        return -prior.log_likelihood(tokens).numpy() / np.log(2.0)

    nearest = vqvae.encode_to_tokens(pixels).numpy()
    cost = 16 * decoded_mse(vqvae, grids, pixels) / decoded_mse(vqvae, nearest, pixels) + rate_lambda * bits(grids)
    assert (cost <= 16 + rate_lambda * bits(nearest) + 1e-3).all()
    without_rate = search_tokens(vqvae, pixels, steps, step_size).numpy()
    assert bits(grids).mean() < bits(without_rate).mean()
    assert (grids != nearest).any() and (grids != without_rate).any()
