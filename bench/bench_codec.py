""".vqf codec against WebP on the same test faces: speed, size, quality, and an exact round trip of every face.

Needs a trained prior run and its VQ-VAE run under --out (the test split of that VQ-VAE).
Encoding is the nearest codes plus range coding (rate_lambda 0); every file is decoded
again in another order (other batches) and must give the encoded tokens; so must the
`.vqfs` container of all the faces, encoded on its own and decoded whole. WebP runs at
the quality whose mean size is closest to the codec's, on the same uint8 faces.

A second table puts the prior's two arithmetics side by side on the same tokens: the
integer pass (what the codec runs) and format 1's float32 XLA program: their code lengths in
bits per face, and faces/s for all tokens known (encoding) and position by position (decoding).
A third does the same for the VQ-VAE's decoder: the integer one `--decode` writes pixels with,
and the float one: faces/s, PSNR of the 8-bit faces, and the pixels they share.

    python bench/bench_codec.py --out OUT [--run prior] [--config experiment.json] [--faces N]
"""

from __future__ import annotations

import io
import time

import numpy as np  # noqa: E402 (after common, which sets the TensorFlow environment)
from common import codec_benchmark_setup, report
from PIL import Image

from vqvae_faces import codec_files, compare  # noqa: E402
from vqvae_faces.codec import CODEC_BATCH  # noqa: E402
from vqvae_faces.evaluation import image_quality  # noqa: E402
from vqvae_faces.inference import decode  # noqa: E402
from vqvae_faces.prior_stream import FloatStream  # noqa: E402


def webp_round_trip(images: np.ndarray, quality: int) -> tuple[float, float, float, np.ndarray]:
    """Mean bits, encode and decode faces/s of WebP (method 6, as --compare) and the decoded faces."""
    started = time.perf_counter()
    blobs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
            buffer, format="WEBP", quality=quality, method=6
        )
        blobs.append(buffer.getvalue())
    encode_seconds = time.perf_counter() - started
    started = time.perf_counter()
    mode = "L" if images.shape[-1] == 1 else "RGB"
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(blob)).convert(mode)) for blob in blobs])
    decode_seconds = time.perf_counter() - started
    bits = 8 * np.mean([len(blob) for blob in blobs])
    return bits, len(images) / encode_seconds, len(images) / decode_seconds, decoded.reshape(images.shape)


def vqf_round_trips(codec, images: np.ndarray) -> tuple[dict, dict, np.ndarray]:
    """Rows (without WebP's ratios) for `.vqf` files and one `.vqfs` container of `images`, timed after
    a warm-up face; and the token grids coded."""
    codec.encode(images[:1])  # compiles the step
    rows, grids = {}, None
    for kind, only in (("files", {"container": False}), ("container", {"files": False})):
        started = time.perf_counter()
        encoded = codec.encode(images, **only)
        encode_rate = len(images) / (time.perf_counter() - started)
        assert grids is None or np.array_equal(encoded.grids, grids), "the container holds other tokens"
        grids = encoded.grids
        started = time.perf_counter()
        if kind == "files":
            order = np.random.default_rng(0).permutation(len(images))  # other groups of files than when encoding
            decoded = codec.decode([encoded.files[i] for i in order], [str(i) for i in order])
            bits, exact = 8 * np.mean([len(data) for data in encoded.files]), (decoded == grids[order])
        else:
            decoded = codec.decode_container(encoded.container, "container")
            bits, exact = 8 * len(encoded.container) / len(images), (decoded == grids)
        rows[kind] = {
            "bits_per_face": bits,
            "encode_faces_per_second": encode_rate,
            "decode_faces_per_second": len(images) / (time.perf_counter() - started),
            "exact_round_trip": float(exact.all(axis=(1, 2)).mean()),
        }
    return rows["files"], rows["container"], grids


def arithmetic_rows(codec, grids: np.ndarray) -> list[dict]:
    """Code lengths and speeds of the prior's distributions for `grids` (N, h, w) in each arithmetic."""
    tokens = grids.reshape(len(grids), -1).astype(np.int64)
    rows = []
    for name, stream, batch in (
        ("integer, formats 2 and 3 (the codec)", codec.stream, None),
        ("format 1: float32 XLA", FloatStream(codec.prior, CODEC_BATCH), CODEC_BATCH),
    ):
        groups = [tokens[start : start + CODEC_BATCH] for start in range(0, len(tokens), CODEC_BATCH)]
        padded = [np.pad(group, ((0, (batch or len(group)) - len(group)), (0, 0))) for group in groups]
        stream.known(padded[0][:1] if batch is None else padded[0])  # compiles the float program
        started = time.perf_counter()
        known = np.concatenate([stream.known(group)[: len(raw)] for group, raw in zip(padded, groups)])
        known_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for group in padded:
            stream.run(lambda position, probabilities, group=group: group[:, position], len(group))
        run_seconds = time.perf_counter() - started
        chosen = np.take_along_axis(known, tokens[..., None], axis=-1)[..., 0]
        rows.append(
            {
                "arithmetic": name,
                "bits_per_face": float(-np.log2(chosen).sum(axis=1).mean()),
                "known_faces_per_second": len(tokens) / known_seconds,
                "position_by_position_faces_per_second": len(tokens) / run_seconds,
            }
        )
    for row in rows:
        row["bits_ratio_to_float32"] = row["bits_per_face"] / rows[-1]["bits_per_face"]
    return rows


def decoder_rows(codec, grids: np.ndarray, originals: np.ndarray) -> list[dict]:
    """Speed and quality of the integer decoder (`FaceCodec.pixels`) and the float one, on the same tokens."""
    codec.pixels(grids[:1]), decode(codec.vqvae, grids[:1], 64)  # tables built, programs traced
    faces = {}
    rows = []
    for name, run in (
        ("integer (--decode)", lambda: codec.pixels(grids)),
        ("float32", lambda: np.round(np.clip(decode(codec.vqvae, grids, 64), 0, 1) * 255).astype(np.uint8)),
    ):
        started = time.perf_counter()
        faces[name] = run()
        seconds = time.perf_counter() - started
        quality = image_quality(originals, faces[name].astype(np.float32) / 255.0)
        rows.append({"decoder": name, "faces_per_second": len(grids) / seconds, "psnr": float(quality["psnr"].mean())})
    shared = float((faces["integer (--decode)"] == faces["float32"]).mean())
    for row in rows:
        row["pixels_equal_to_float32"] = shared
    return rows


def main() -> None:
    args, config, prior_run, out, images, _ = codec_benchmark_setup(__doc__, None, "use only the first N test faces")
    originals = images.astype(np.float32) / 255.0
    with codec_files.opened_codec(config, prior_run, out) as codec:
        files, container, grids = vqf_round_trips(codec, images)
        psnr = float(image_quality(originals, codec.pixels(grids).astype(np.float32) / 255.0)["psnr"].mean())
        arithmetics = arithmetic_rows(codec, grids)
        decoders = decoder_rows(codec, grids, originals)
    candidates = {q: compare.encode_decode(images, "WebP", q).bits_per_image for q in range(1, 101, 3)}
    quality = min(candidates, key=lambda q: abs(candidates[q] - files["bits_per_face"]))
    webp_bits, webp_encode, webp_decode, webp_decoded = webp_round_trip(images, quality)
    webp = {
        "bits_per_face": webp_bits,
        "psnr": float(image_quality(originals, webp_decoded.astype(np.float32) / 255.0)["psnr"].mean()),
        "encode_faces_per_second": webp_encode,
        "decode_faces_per_second": webp_decode,
        "exact_round_trip": None,
    }
    rows = []
    for name, row in (
        (".vqf (nearest codes, range-coded with the prior)", {**files, "psnr": psnr}),
        (".vqfs container of all the faces", {**container, "psnr": psnr}),
        (f"WebP quality {quality}, method 6", webp),
    ):
        rows.append(
            {
                "codec": name,
                **row,
                "encode_ratio_to_webp": row["encode_faces_per_second"] / webp_encode,
                "decode_ratio_to_webp": row["decode_faces_per_second"] / webp_decode,
            }
        )
    report("bench_codec", rows, {**vars(args), "test_faces": len(images)})
    report("bench_codec_arithmetic", arithmetics, {**vars(args), "test_faces": len(images)})
    report("bench_codec_decoder", decoders, {**vars(args), "test_faces": len(images)})


if __name__ == "__main__":
    main()
