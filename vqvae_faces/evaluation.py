"""Evaluation of a trained run on untouched test faces: tokens, reconstructions, metrics."""

from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from vqvae_class_keras import VQVAE
from vqvae_faces import lfw_files, pipeline, visualize
from vqvae_faces.atomic_files import save_npz_atomically, write_json_atomically
from vqvae_faces.config import RunConfig
from vqvae_faces.errors import CheckpointError, EvaluationError
from vqvae_faces.gaussian_vae import VAE
from vqvae_faces.model_settings import load_model
from vqvae_faces.run_folder import RunPaths, read_state
from vqvae_faces.token_search import search_tokens

log = logging.getLogger("vqvae_faces.eval")

PREVIEW_FACES = 10
SEARCH_PROGRESS_REPORTS = 10  # log lines per token search

# Each model's compiled encode and decode functions, traced once and reused by every call.
_COMPILED: "weakref.WeakKeyDictionary[keras.Model, dict]" = weakref.WeakKeyDictionary()


def compiled(model: keras.Model, method: str):
    """`tf.function(getattr(model, method))`, created once per model and method."""
    functions = _COMPILED.setdefault(model, {})
    if method not in functions:
        functions[method] = tf.function(getattr(model, method))
    return functions[method]


def image_quality(originals: np.ndarray, reconstructions: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per-image PSNR (dB), SSIM and MSE for float images in [0, 1], data range 1."""
    psnr, ssim, mse = [], [], []
    for start in range(0, len(originals), batch_size):
        a = tf.convert_to_tensor(originals[start : start + batch_size], tf.float32)
        b = tf.convert_to_tensor(reconstructions[start : start + batch_size], tf.float32)
        psnr.append(tf.image.psnr(a, b, max_val=1.0).numpy())
        ssim.append(tf.image.ssim(a, b, max_val=1.0).numpy())
        mse.append(tf.reduce_mean(tf.square(a - b), axis=[1, 2, 3]).numpy())
    return {"psnr": np.concatenate(psnr), "ssim": np.concatenate(ssim), "mse": np.concatenate(mse)}


def code_statistics(counts: np.ndarray) -> dict[str, float]:
    """Fraction of codes used, perplexity (exp of the token entropy) and entropy, from per-code token counts."""
    probabilities = counts / counts.sum()
    nonzero = probabilities[probabilities > 0]
    return {
        "codebook_usage": float((counts > 0).mean()),
        "perplexity": float(np.exp(-(nonzero * np.log(nonzero)).sum())),
        "token_entropy_bits": float(-(nonzero * np.log2(nonzero)).sum()),
    }


def tokenize(model: VQVAE, images: np.ndarray, batch_size: int, search_steps: int = 0, step_size: float = 0.0):
    """uint8 images (N, H, W, C) -> int16 token grids (N, h, w).

    With `search_steps` > 0 the tokens come from `token_search.search_tokens` (chosen by
    decoding, never worse per image than the nearest codes; progress is logged,
    since this takes minutes for a few thousand faces on a CPU); otherwise they
    are the encoder's nearest codes.
    """

    def search(batch):
        return search_tokens(model, batch, search_steps, step_size)

    encode = tf.function(search) if search_steps > 0 else compiled(model, "encode_to_tokens")
    if not len(images):  # e.g. an empty validation split: no grids, but of the grid's shape
        grid = model.encode_to_tokens(np.zeros((1, *images.shape[1:]), np.float32)).shape[1:]
        return np.zeros((0, *grid), np.int16)
    grids, done, next_report = [], 0, len(images) / SEARCH_PROGRESS_REPORTS
    for batch in pipeline.make_dataset(images, batch_size):
        grids.append(encode(batch).numpy())
        done += len(grids[-1])
        if search_steps > 0 and done >= next_report and done < len(images):
            log.info("token search: %d of %d faces", done, len(images))
            next_report += len(images) / SEARCH_PROGRESS_REPORTS
    return np.concatenate(grids).astype(np.int16)


def decode(model: VQVAE, tokens: np.ndarray, batch_size: int) -> np.ndarray:
    """int token grids (N, h, w) -> float32 reconstructions (N, H, W, C)."""
    decode_fn = compiled(model, "decode_tokens")
    dataset = tf.data.Dataset.from_tensor_slices(tokens.astype(np.int32)).batch(batch_size)
    return np.concatenate([decode_fn(batch).numpy() for batch in dataset]).astype(np.float32)


def reconstruct(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Reconstructions of uint8 images through the model's inference path."""
    return model.predict(pipeline.make_dataset(images, batch_size), verbose=0).astype(np.float32)


def load_trained_model(paths: RunPaths, run_name: str) -> tuple[keras.Model, Path]:
    """The run's best.keras, else latest.keras (with a warning), loaded; a clear error when neither loads."""
    problems = []
    for path in (paths.best_model, paths.latest_model):
        if not path.is_file():
            continue
        try:
            model = load_model(path)
        except CheckpointError as error:
            problems.append(str(error))
            log.warning("%s", error)
            continue
        if problems or path == paths.latest_model:
            log.warning("run %s: evaluating %s (no usable best.keras)", run_name, path)
        return model, path
    if problems:
        raise EvaluationError(
            f"no loadable model for run {run_name!r}: " + "; ".join(problems) + ". Restore the file from a copy, "
            "or pass --retrain to train the run from scratch."
        )
    raise EvaluationError(
        f"no trained model for run {run_name!r}: {paths.best_model} does not exist. "
        'Train it first (drop --eval, or set "enable_training": true).'
    )


def check_image_shape(run_name: str, model: keras.Model, images: np.ndarray) -> None:
    """An `EvaluationError` when `images` (N, H, W, C) are not the shape `model` was trained on."""
    expected = tuple(model.get_build_config()["input_shape"][1:]) if model.get_build_config() else None
    if expected and tuple(expected) != tuple(images.shape[1:]):
        raise EvaluationError(
            f"run {run_name!r} was trained on images of shape {tuple(expected)} but the evaluation data has "
            f"shape {tuple(images.shape[1:])}: use the data.image_size and data source it was trained with."
        )


@dataclass
class EvaluationResult:
    """What `evaluate_run` measured: summary metrics, per-image quality, reconstructions (N, H, W, C),
    and for a VQ-VAE the saved token grids (N, h, w); for a VAE the per-image quality of
    reconstructions from posterior samples."""

    metrics: dict
    quality: dict[str, np.ndarray]
    reconstructions: np.ndarray
    tokens: Optional[np.ndarray] = None
    sampled_quality: Optional[dict[str, np.ndarray]] = None


@dataclass(frozen=True)
class TestFaces:
    """Faces to evaluate on: uint8 images (N, H, W, C), never augmented; their file names (N,);
    and what they are (recorded in metrics.json as `dataset`)."""

    images: np.ndarray
    names: np.ndarray
    description: str


def evaluate_run(
    run_name: str, run: RunConfig, model: keras.Model, paths: RunPaths, faces: TestFaces
) -> EvaluationResult:
    """Evaluate a trained run on `faces`; write tokens, pictures and metrics.json.

    For a VQ-VAE the test faces are encoded to tokens (searched with
    `run.token_search_steps` decoder steps when > 0, see `token_search.search_tokens`),
    saved to `checkpoints/<run>/tokens.npz`, and the reconstructions are decoded
    from those saved tokens. With a search, the quality of the encoder's nearest
    codes is reported beside it (`psnr_nearest_codes`, `ssim_nearest_codes`).
    """
    images, names, dataset, batch_size = faces.images, faces.names, faces.description, run.batch_size
    token_search_steps, token_search_step_size = run.token_search_steps, run.token_search_step_size
    check_image_shape(run_name, model, images)
    originals = images.astype(np.float32) / 255.0
    metrics: dict = {"run": run_name, "model": type(model).__name__, "dataset": dataset, "num_test_images": len(images)}
    tokens, sampled_quality = None, None
    if isinstance(model, VQVAE):
        if token_search_steps > 0:
            log.info(
                "run %s: choosing the tokens of %d faces by decoding (%d steps each)",
                run_name,
                len(images),
                token_search_steps,
            )
        started = time.perf_counter()
        tokens = tokenize(model, images, batch_size, token_search_steps, token_search_step_size)
        metrics["token_search_steps"] = token_search_steps
        metrics["tokenize_images_per_second"] = len(images) / (time.perf_counter() - started)
        if token_search_steps > 0:
            nearest = image_quality(originals, decode(model, tokenize(model, images, batch_size), batch_size))
            metrics.update({f"{name}_nearest_codes": float(nearest[name].mean()) for name in ("psnr", "ssim")})
        token_file = paths.checkpoints / "tokens.npz"
        save_npz_atomically(token_file, compressed=True, tokens=tokens, names=np.asarray(names))
        with np.load(token_file, allow_pickle=False) as saved:
            reconstructions = decode(model, saved["tokens"], batch_size)
        k = model.quantizer.num_embeddings
        counts = np.bincount(tokens.reshape(-1).astype(np.int64), minlength=k)
        stats = code_statistics(counts)
        metrics.update(stats)
        metrics["num_embeddings"] = k
        metrics["token_grid"] = list(tokens.shape[1:])
        metrics["bits_per_image"] = float(np.prod(tokens.shape[1:]) * math.log2(k))
        metrics["entropy_coded_bits_per_image"] = float(np.prod(tokens.shape[1:]) * stats["token_entropy_bits"])
        visualize.plot_code_usage(
            counts,
            paths.images / "codebook_usage.png",
            f"{run_name}: {stats['codebook_usage']:.0%} of {k} codes used on the test faces",
        )
    else:
        reconstructions = reconstruct(model, images, batch_size)
        metrics["kl_bits_per_image"] = float(_mean_kl_bits(model, images, batch_size))
        metrics["bits_per_image"] = metrics["kl_bits_per_image"]
        sampled_quality = image_quality(originals, _posterior_samples(model, images, batch_size))
        metrics.update({f"{name}_posterior_sample": float(v.mean()) for name, v in sampled_quality.items()})
    quality = image_quality(originals, reconstructions)
    metrics.update({name: float(values.mean()) for name, values in quality.items()})
    state = read_state(paths) or {}
    metrics["train_images_per_second"] = state.get("train_images_per_second")
    metrics["train_seconds"] = state.get("train_seconds")
    metrics["epochs_trained"] = state.get("epochs_done")
    metrics["image_size"] = int(images.shape[1])
    write_json_atomically(metrics, paths.images / "metrics.json")
    save_npz_atomically(paths.checkpoints / "test_quality.npz", compressed=True, names=np.asarray(names), **quality)
    count = min(PREVIEW_FACES, len(images))
    visualize.save_image_grid(
        [originals[:count], reconstructions[:count]],
        ["original", "reconstruction"],
        paths.images / "reconstructions.png",
        title=f"{run_name}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f} on {len(images)} test faces",
    )
    return EvaluationResult(metrics, quality, reconstructions, tokens, sampled_quality)


def _posterior_samples(model: VAE, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Reconstructions from one posterior sample per image, seeded by the batch number (repeatable)."""
    decode_sample = tf.function(model.decode_posterior_sample)
    batches = pipeline.make_dataset(images, batch_size)
    return np.concatenate(
        [decode_sample(batch, tf.constant([0, number], tf.int64)).numpy() for number, batch in enumerate(batches)]
    ).astype(np.float32)


def _mean_kl_bits(model: VAE, images: np.ndarray, batch_size: int) -> float:
    total, count = 0.0, 0
    for batch in pipeline.make_dataset(images, batch_size):
        kl = model.kl_nats(*model.posterior(batch))
        total += float(tf.reduce_sum(kl)) / math.log(2.0)
        count += int(kl.shape[0])
    return total / max(count, 1)


def metrics_table(all_metrics: list[dict]) -> str:
    """The headline numbers of each run, as aligned text ("" when there are none)."""
    if not all_metrics:
        return ""
    columns = [
        "run",
        "model",
        "num_test_images",
        "psnr",
        "ssim",
        "mse",
        "codebook_usage",
        "perplexity",
        "bits_per_image",
        "train_images_per_second",
    ]
    frame = pd.DataFrame([{c: m.get(c) for c in columns} for m in all_metrics])
    return frame.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def test_set(run_paths: RunPaths, faces: lfw_files.FaceSet) -> TestFaces:
    """The run's saved test split of `faces`."""
    split = lfw_files.load_split(run_paths.split, faces)
    return TestFaces(
        faces.subset(split["test"]),
        faces.names[split["test"]],
        faces.description + " (identity-disjoint test split)",
    )
