"""VQ-VAE vs VAE vs JPEG/WebP on the same held-out faces: table, pictures, report.html.

The codecs see exactly the test images the models see (same crop and size, uint8).
Each codec is run at the highest quality whose mean size fits the VQ-VAE's token
budget (grid cells x log2 K bits), and over a range of qualities for the
rate-distortion plot. CompressAI's learned codecs join the table and the plot when
`bench/bench_compressai.py` has measured them on the same test faces (its
`compressai.json` in the comparison's folder).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from vqvae_faces import visualize  # noqa: E402
from vqvae_faces.atomic_files import write_atomically, write_text_atomically  # noqa: E402
from vqvae_faces.codec import CODEC_BATCH  # noqa: E402
from vqvae_faces.evaluation import EvaluationResult, image_quality  # noqa: E402
from vqvae_faces.lfw_files import pixels_fingerprint  # noqa: E402
from vqvae_faces.vqf_format import HEADER_BYTES  # noqa: E402

log = logging.getLogger("vqvae_faces.compare")

CODECS = {
    "JPEG": dict(format="JPEG", optimize=True),
    "WebP": dict(format="WEBP", method=6),
}
CURVE_QUALITIES = (1, 2, 3, 5, 7, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 95)
BOOTSTRAP_SAMPLES = 2000
PREVIEW_FACES = 8
COMPRESSAI_FILE = "compressai.json"  # bench/bench_compressai.py writes it into images_saved/compare/


@dataclass
class CodecResult:
    """One codec at one quality: mean bits per image and the decoded images."""

    codec: str
    quality: int
    bits_per_image: float
    decoded: np.ndarray


def encode_decode(images: np.ndarray, codec: str, quality: int) -> CodecResult:
    """Compress each uint8 image (N, H, W, C) with Pillow at `quality`; return mean size and decodings."""
    sizes, decoded = [], []
    grayscale = images.shape[-1] == 1
    for image in images:
        picture = Image.fromarray(image[..., 0] if grayscale else image)
        buffer = io.BytesIO()
        picture.save(buffer, quality=quality, **CODECS[codec])
        sizes.append(buffer.tell())
        buffer.seek(0)
        with Image.open(buffer) as back:
            array = np.asarray(back.convert("L" if grayscale else "RGB"))
        decoded.append(array[..., None] if grayscale else array)
    return CodecResult(codec, quality, 8.0 * float(np.mean(sizes)), np.stack(decoded))


def best_quality_within(images: np.ndarray, codec: str, budget_bits: float) -> tuple[CodecResult, bool]:
    """Highest quality (1..100) whose mean size is <= budget, by bisection (size grows with quality).

    Returns (result, fits); when even quality 1 is too large, returns quality 1 and fits=False.
    """
    low = encode_decode(images, codec, 1)
    if low.bits_per_image > budget_bits:
        return low, False
    best, lo, hi = low, 2, 100
    while lo <= hi:
        middle = (lo + hi) // 2
        result = encode_decode(images, codec, middle)
        if result.bits_per_image <= budget_bits:
            best, lo = result, middle + 1
        else:
            hi = middle - 1
    return best, True


def bootstrap_interval(values: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values`."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (samples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def lzma_bits_per_image(tokens: np.ndarray) -> float:
    """Real size of all token grids compressed losslessly with LZMA (xz), per image."""
    return 8.0 * len(lzma.compress(tokens.astype(np.uint16).tobytes(), preset=9)) / len(tokens)


def _row(method: str, setting: str, bits: float, quality: dict[str, np.ndarray], **extra) -> dict:
    low, high = bootstrap_interval(quality["psnr"])
    return {
        "method": method,
        "setting": setting,
        "bits_per_image": bits,
        "psnr": float(quality["psnr"].mean()),
        "psnr_ci95_low": low,
        "psnr_ci95_high": high,
        "ssim": float(quality["ssim"].mean()),
        "mse": float(quality["mse"].mean()),
        **extra,
    }


def rate_distortion_curve(images: np.ndarray, codec: str, qualities=CURVE_QUALITIES) -> pd.DataFrame:
    originals = images.astype(np.float32) / 255.0
    rows = []
    for quality in qualities:
        result = encode_decode(images, codec, quality)
        scores = image_quality(originals, result.decoded.astype(np.float32) / 255.0)
        rows.append(
            {
                "codec": codec,
                "quality": quality,
                "bits_per_image": result.bits_per_image,
                "psnr": float(scores["psnr"].mean()),
                "ssim": float(scores["ssim"].mean()),
            }
        )
    return pd.DataFrame(rows)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""

    def cell(value):
        if isinstance(value, float):
            return "" if np.isnan(value) else f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def build_table(
    images: np.ndarray, results: dict[str, EvaluationResult]
) -> tuple[pd.DataFrame, dict[str, CodecResult], Optional[float]]:
    """One row per model run, its entropy-coded size, and each codec at the VQ-VAE budget."""
    rows = []
    budget = None
    for name, result in results.items():
        m = result.metrics
        if m["model"] == "VQVAE":
            budget = m["bits_per_image"] if budget is None else min(budget, m["bits_per_image"])
        rows += _model_rows(name, result)
    codecs = {}
    if budget is not None:
        originals = images.astype(np.float32) / 255.0
        for codec in CODECS:
            result, fits = best_quality_within(images, codec, budget)
            codecs[codec] = result
            scores = image_quality(originals, result.decoded.astype(np.float32) / 255.0)
            note = f"quality {result.quality}" if fits else f"quality 1 does NOT fit the {budget:.0f}-bit budget"
            rows.append(
                _row(codec, note, result.bits_per_image, scores, codec_quality=result.quality, fits_budget=fits)
            )
    return pd.DataFrame(rows), codecs, budget


def _model_rows(name: str, result: EvaluationResult) -> list[dict]:
    """The rows of one model run: a VQ-VAE's nominal size, entropy and xz; a prior's code length; a VAE's KL."""
    m = result.metrics
    if m["model"] == "VQVAE":
        grid = "x".join(str(v) for v in m["token_grid"])
        setting = f"fixed grid of {grid} tokens, K={m['num_embeddings']} (nominal size, no file)"
        return [
            _row(
                f"VQ-VAE ({name})",
                setting,
                m["bits_per_image"],
                result.quality,
                codebook_usage=m["codebook_usage"],
                perplexity=m["perplexity"],
            ),
            _row(
                f"VQ-VAE ({name}) + entropy coding",
                "empirical unigram entropy of the test tokens (no decoder could use it)",
                m["entropy_coded_bits_per_image"],
                result.quality,
            ),
            _row(
                f"VQ-VAE ({name}) + xz",
                "tokens compressed with LZMA",
                lzma_bits_per_image(result.tokens),
                result.quality,
            ),
        ]
    if m.get("tokens_from"):
        setting = "nearest codes; ideal code length -log2 p(tokens) under the prior"
        return [_row(f"VQ-VAE ({m['tokens_from']}) + prior ({name})", setting, m["bits_per_image"], result.quality)]
    kl = m["kl_bits_per_image"]
    return [
        _row(
            f"VAE ({name})",
            "posterior mean decoded (needs more than KL bits)",
            kl,
            result.quality,
            kl_bits_per_image=kl,
        ),
        _row(
            f"VAE ({name}), posterior sample",
            "one z ~ q(z|x) decoded: what about KL bits can carry",
            kl,
            result.sampled_quality,
            kl_bits_per_image=kl,
        ),
    ]


def vqf_rows(codec, prior_run: str, images: np.ndarray, names, lambdas, folder: Path) -> list[dict]:
    """The VQ-VAE codec's rate-distortion points: every test face written as a real `.vqf` file per
    `rate_lambda`, sizes read back from disk (header included), quality of the decoded tokens; and
    all of them in one `.vqfs` container (`container_bits_per_image`: its size / the faces).

    The first `CODEC_BATCH` files of each setting are decoded from disk and must give the
    encoded tokens (the full round trip of every face is `bench/bench_codec.py`'s).
    """
    originals = images.astype(np.float32) / 255.0
    tokens = f"tokens searched ({codec.search_steps} steps)" if codec.search_steps else "nearest codes"
    rows = []
    for rate_lambda in lambdas:
        target = folder / prior_run / f"lambda_{rate_lambda:g}"
        target.mkdir(parents=True, exist_ok=True)
        encoded = codec.encode(images, rate_lambda)
        files, container, grids = encoded.files, encoded.container, encoded.grids
        paths = [target / (str(name).replace("/", "__").rsplit(".", 1)[0] + ".vqf") for name in names]
        for data, path in zip(files, paths):
            write_atomically(path, lambda tmp, data=data: tmp.write_bytes(data))
        container_path = target.with_name(f"{target.name}.vqfs")
        write_atomically(container_path, lambda tmp: tmp.write_bytes(container))
        sizes = np.array([8 * path.stat().st_size for path in paths], np.float64)
        checked = paths[:CODEC_BATCH]
        decoded = codec.decode([path.read_bytes() for path in checked], [str(path) for path in checked])
        if not np.array_equal(decoded, grids[: len(checked)]):
            raise RuntimeError(f"the .vqf files in {target} do not decode to the tokens they were made from")
        scores = image_quality(originals, codec.pixels(grids).astype(np.float32) / 255.0)  # the faces --decode writes
        rows.append(
            _row(
                f"VQ-VAE codec ({prior_run})",
                f"rate_lambda {rate_lambda:g}, {tokens}: real .vqf files, {HEADER_BYTES}-byte header included",
                float(sizes.mean()),
                scores,
                rate_lambda=rate_lambda,
                search_steps=codec.search_steps,
                payload_bits_per_image=float(sizes.mean() - 8 * HEADER_BYTES),
                container_bits_per_image=8.0 * container_path.stat().st_size / len(images),
                files=str(target),
            )
        )
        log.info(
            "codec at rate_lambda %g: %.0f bits per face, PSNR %.2f dB", rate_lambda, sizes.mean(), rows[-1]["psnr"]
        )
    return rows


def compressai_rows(folder: Path, images: np.ndarray) -> list[dict]:
    """CompressAI's points from `folder`/compressai.json (`bench/bench_compressai.py`), one per model and
    lambda, when they were measured on exactly these test faces (uint8 (N, H, W, C)); otherwise none,
    with a warning: a file of other faces (another split or run) or one that does not parse."""
    path = folder / COMPRESSAI_FILE
    if not path.is_file():
        return []
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        faces = record["test_faces"]
        points = [
            (
                f"CompressAI {point['model']}",
                f"lambda {point['lambda']:g}, {point['train_minutes']:g} min of training: real bitstreams",
                float(point["bits_per_face"]),
                np.asarray(point["mse_per_face"], np.float64),
                {name: point[name] for name in ("encode_faces_per_second", "decode_faces_per_second")},
            )
            for point in record["rows"]
        ]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as error:
        log.warning("%s cannot be read (%s): CompressAI left out of the comparison", path, str(error))
        return []
    if faces != pixels_fingerprint(images) or any(len(mse) != len(images) for *_, mse, _ in points):
        log.warning(
            "%s was measured on other test faces: CompressAI left out of the comparison "
            "(run bench/bench_compressai.py again with this --out and these runs)",
            path,
        )
        return []
    rows = []
    for method, setting, bits, mse, speeds in points:
        quality = {"psnr": 10 * np.log10(1.0 / np.maximum(mse, 1e-12)), "mse": mse, "ssim": np.full(len(mse), np.nan)}
        rows.append(_row(method, setting, bits, quality, **speeds))
    return rows


def plot_rate_distortion(curves: pd.DataFrame, table: pd.DataFrame, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for codec, curve in curves.groupby("codec"):
        axis.plot(curve["bits_per_image"], curve["psnr"], marker=".", label=f"{codec} (quality 1..95)")
    for prefix, marker, knob in (("VQ-VAE codec", "o", ", .vqf files (rate_lambda)"), ("CompressAI", "s", " (lambda)")):
        for method, points in table[table["method"].str.startswith(prefix)].groupby("method"):
            points = points.sort_values("bits_per_image")
            axis.plot(points["bits_per_image"], points["psnr"], marker=marker, label=method + knob)
    models = table[table["method"].str.startswith(("VQ-VAE", "VAE")) & ~table["method"].str.startswith("VQ-VAE codec")]
    for row in models.itertuples(index=False):
        axis.scatter(row.bits_per_image, row.psnr, s=60, zorder=3, label=row.method)
    axis.set_xscale("log")
    axis.set_xlabel("bits per image")
    axis.set_ylabel("PSNR (dB)")
    axis.set_title("rate-distortion on the held-out test faces")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    visualize.save_figure(figure, path)


def _embedded_png(path: Path) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def html_table(table: pd.DataFrame) -> str:
    """The comparison as report.html shows it: what a reader compares (size, PSNR with its interval, SSIM),
    the setting last, in a page's width."""
    shown = pd.DataFrame(
        {
            "method": table["method"],
            "bits per face": table["bits_per_image"].map(lambda v: f"{v:,.0f}"),
            "PSNR dB (95% interval)": [
                f"{psnr:.2f} ({low:.2f} to {high:.2f})"
                for psnr, low, high in zip(table["psnr"], table["psnr_ci95_low"], table["psnr_ci95_high"])
            ],
            "SSIM": table["ssim"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}"),
            "setting": table["setting"],
        }
    )
    return shown.to_html(index=False, na_rep="")


def reconstruction_rows(images: np.ndarray, results: dict[str, EvaluationResult], codecs: dict[str, CodecResult]):
    """The rows of comparison.png and their labels: the originals, each model run's reconstructions (a prior's
    are its VQ-VAE's, already shown, so priors have none) and each codec's decoded faces."""
    count = min(PREVIEW_FACES, len(images))
    rows, labels = [images[:count]], ["original"]
    for name, result in results.items():
        if not result.metrics.get("tokens_from"):
            rows.append(result.reconstructions[:count])
            labels.append(name)
    for codec, result in codecs.items():
        rows.append(result.decoded[:count])
        labels.append(f"{codec} q{result.quality}")
    return rows, labels


def write_html(folder: Path, table: pd.DataFrame, run_images: dict[str, Path], dataset: str) -> Path:
    """report.html with every picture embedded as data: URIs (opens offline, no external references)."""
    sections = [
        "<h2>Comparison on the held-out test faces</h2>",
        f"<p>{html.escape(dataset)}</p>",
        html_table(table),
        "<p>Every column, the intervals' bounds and each run's extra figures: comparison.csv.</p>",
        "<h2>Rate-distortion</h2>",
        _embedded_png(folder / "rate_distortion.png"),
        "<h2>Reconstructions</h2>",
        _embedded_png(folder / "comparison.png"),
    ]
    for name, run_folder in run_images.items():
        sections += [
            f"<h2>Run {html.escape(name)}</h2>",
            _embedded_png(run_folder / "training_curves.png"),
            _embedded_png(run_folder / "codebook_usage.png"),
            _embedded_png(run_folder / "samples.png"),
            _embedded_png(run_folder / "nearest_training_faces.png"),
        ]
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>vqvae-faces comparison</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;"
        "vertical-align:top}td:last-child{font-size:12px;color:#555}"
        "img{max-width:100%}</style></head><body><h1>vqvae-faces comparison</h1>"
        + "\n".join(sections)
        + "</body></html>"
    )
    path = folder / "report.html"
    write_text_atomically(page, path)
    return path


def write_comparison(
    folder: Path,
    images: np.ndarray,
    results: dict[str, EvaluationResult],
    run_images: dict[str, Path],
    dataset: str,
    extra_rows: list[dict] = (),
) -> pd.DataFrame:
    """Write comparison.csv/.md/.png, rate_distortion.png and report.html into `folder`
    (`extra_rows`: the `.vqf` codec's points from `vqf_rows`; CompressAI's from `compressai_rows`)."""
    folder.mkdir(parents=True, exist_ok=True)
    table, codecs, budget = build_table(images, results)
    extra_rows = [*extra_rows, *compressai_rows(folder, images)]
    table = pd.concat([table, pd.DataFrame(extra_rows)], ignore_index=True) if extra_rows else table
    write_text_atomically(table.to_csv(index=False), folder / "comparison.csv")
    write_text_atomically(markdown_table(table), folder / "comparison.md")
    curves = pd.concat([rate_distortion_curve(images, codec) for codec in CODECS])
    write_text_atomically(curves.to_csv(index=False), folder / "rate_distortion.csv")
    plot_rate_distortion(curves, table, folder / "rate_distortion.png")
    rows, labels = reconstruction_rows(images, results, codecs)
    title = f"same test faces; codecs at the VQ-VAE budget of {budget:.0f} bits" if budget else "same test faces"
    visualize.save_image_grid(rows, labels, folder / "comparison.png", title=title)
    write_html(folder, table, run_images, dataset)
    log.info("comparison written to %s", folder)
    return table
