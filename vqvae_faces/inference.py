"""A trained run's models at work: loading them, and turning faces into tokens and tokens into faces.

Every function here compiles its model's step once (`compiled`) and checks shapes before any work.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from vqvae_class_keras import VQVAE
from vqvae_faces import pipeline
from vqvae_faces.compiled import compiled
from vqvae_faces.errors import CheckpointError, EvaluationError
from vqvae_faces.model_settings import load_model
from vqvae_faces.run_folder import RunPaths
from vqvae_faces.token_search import search_tokens

log = logging.getLogger("vqvae_faces.eval")

SEARCH_PROGRESS_REPORTS = 10  # log lines per token search


def tokenize(model: VQVAE, images: np.ndarray, batch_size: int, search_steps: int = 0, step_size: float = 0.0):
    """uint8 images (N, H, W, C) -> int16 token grids (N, h, w).

    With `search_steps` > 0 the tokens come from `token_search.search_tokens` (chosen by
    decoding, never worse per image than the nearest codes; progress is logged,
    since this takes minutes for a few thousand faces on a CPU); otherwise they
    are the encoder's nearest codes.
    """

    if search_steps > 0:
        encode = compiled(model, search_tokens, steps=search_steps, step_size=step_size)
    else:
        encode = compiled(model, type(model).encode_to_tokens)  # a subclass's own tokens
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
    decode_fn = compiled(model, type(model).decode_tokens)
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
            log.warning("%s", str(error))
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
