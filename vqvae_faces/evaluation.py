"""Evaluation of a trained run on untouched test faces: the metrics, and the files and pictures that hold them."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Optional

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from vqvae_class_keras import VQVAE
from vqvae_faces import lfw_files, pipeline, visualize
from vqvae_faces.atomic_files import save_npz_atomically, write_json_atomically
from vqvae_faces.compiled import compiled
from vqvae_faces.config import AutoencoderConfig, VQVAEConfig
from vqvae_faces.gaussian_vae import VAE
from vqvae_faces.inference import check_image_shape, decode, reconstruct, tokenize
from vqvae_faces.run_folder import RunPaths, read_state

log = logging.getLogger("vqvae_faces.eval")

PREVIEW_FACES = 10


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
    run_name: str, run: AutoencoderConfig, model: keras.Model, paths: RunPaths, faces: TestFaces
) -> EvaluationResult:
    """Evaluate a trained run on `faces`; write tokens, pictures and metrics.json.

    For a VQ-VAE the test faces are encoded to tokens (searched with
    `run.token_search_steps` decoder steps when > 0, see `token_search.search_tokens`),
    saved to `checkpoints/<run>/tokens.npz`, and the reconstructions are decoded
    from those saved tokens. With a search, the quality of the encoder's nearest
    codes is reported beside it (`psnr_nearest_codes`, `ssim_nearest_codes`).
    """
    images, names, dataset = faces.images, faces.names, faces.description
    check_image_shape(run_name, model, images)
    originals = images.astype(np.float32) / 255.0
    metrics: dict = {"run": run_name, "model": type(model).__name__, "dataset": dataset, "num_test_images": len(images)}
    tokens, sampled_quality = None, None
    if isinstance(model, VQVAE):
        tokens, reconstructions = _evaluate_tokens(run_name, run, model, paths, faces, metrics)
    else:
        reconstructions = reconstruct(model, images, run.batch_size)
        metrics["kl_bits_per_image"] = float(_mean_kl_bits(model, images, run.batch_size))
        metrics["bits_per_image"] = metrics["kl_bits_per_image"]
        sampled_quality = image_quality(originals, _posterior_samples(model, images, run.batch_size))
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


def _evaluate_tokens(run_name: str, run: VQVAEConfig, model: VQVAE, paths: RunPaths, faces: TestFaces, metrics: dict):
    """A VQ-VAE's tokens of the test faces (saved to tokens.npz) and its reconstructions decoded from the
    saved file; adds the tokens' figures to `metrics` and draws the codebook's usage."""
    images, batch_size, steps = faces.images, run.batch_size, run.token_search_steps
    if steps > 0:
        log.info("run %s: choosing the tokens of %d faces by decoding (%d steps each)", run_name, len(images), steps)
    started = time.perf_counter()
    tokens = tokenize(model, images, batch_size, steps, run.token_search_step_size)
    metrics["token_search_steps"] = steps
    metrics["tokenize_images_per_second"] = len(images) / (time.perf_counter() - started)
    if steps > 0:
        originals = images.astype(np.float32) / 255.0
        nearest = image_quality(originals, decode(model, tokenize(model, images, batch_size), batch_size))
        metrics.update({f"{name}_nearest_codes": float(nearest[name].mean()) for name in ("psnr", "ssim")})
    token_file = paths.checkpoints / "tokens.npz"
    save_npz_atomically(token_file, compressed=True, tokens=tokens, names=np.asarray(faces.names))
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
    return tokens, reconstructions


def _posterior_samples(model: VAE, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Reconstructions from one posterior sample per image, seeded by the batch number (repeatable)."""
    decode_sample = compiled(model, VAE.decode_posterior_sample)
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
