"""Run settings to models: the one mapping to constructor arguments, building, loading, compatibility.

A new model setting is a `RunConfig` field, a constructor argument, and its line in
`model_arguments`; compatibility with saved checkpoints follows from the constructor
arguments every `.keras` file stores.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Optional

import keras

from vqvae_class_keras import VQVAE
from vqvae_faces.config import RunConfig
from vqvae_faces.errors import CheckpointError
from vqvae_faces.gaussian_vae import VAE
from vqvae_faces.token_prior import CausalTransformer, GatedPixelCNN

# Constructor arguments of a saved model that may differ from the current settings when it is
# resumed or evaluated: the quantizer's training policy and the seed of its random draws. Every
# other argument is architecture or training objective and must match (see `model_mismatches`).
RESUMABLE_MODEL_ARGUMENTS = frozenset({"commitment_cost", "decay", "epsilon", "codebook_init", "seed"})
MODEL_CLASSES = {"vqvae": VQVAE, "vae": VAE}
PRIOR_CLASSES = {"transformer": CausalTransformer, "pixelcnn": GatedPixelCNN}
# A prior's token alphabet follows from its VQ-VAE run, whose checkpoint the prior's
# config.json records (see `run_folder.check_compatible`); the rest of its arguments must match.
DERIVED_PRIOR_ARGUMENTS = frozenset({"num_embeddings", "grid_size"})


def model_class(run: RunConfig) -> type:
    """The Keras model class a run trains."""
    return PRIOR_CLASSES[run.prior.architecture] if run.model == "prior" else MODEL_CLASSES[run.model]


def model_arguments(
    run: RunConfig,
    channels: int,
    data_variance: Optional[float],
    seed: int,
    tokens: tuple[int, tuple[int, int]] = (2, (1, 1)),
) -> dict:
    """The constructor arguments of `model_class(run)` for the run's settings.

    The one place that maps settings to a model: a new model setting is a constructor
    argument plus its entry here (and its `RunConfig` field). `tokens` is a prior's
    (K, (rows, columns)), from `ExperimentConfig.token_alphabet`.
    """
    if run.model == "prior":
        num_embeddings, grid_size = tokens
        p = run.prior
        shared = dict(num_embeddings=num_embeddings, grid_size=list(grid_size), num_layers=p.num_layers)
        if p.architecture == "transformer":
            return dict(width=p.width, num_heads=p.num_heads, mlp_ratio=p.mlp_ratio, **shared)
        return dict(channels=p.width, kernel_size=p.kernel_size, **shared)
    trunk = dict(
        image_channels=channels,
        encoder_filters=list(run.encoder_filters),
        decoder_filters=list(run.decoder_filters),
        num_residual_blocks=run.num_residual_blocks,
        residual_hidden_channels=run.residual_hidden_channels,
        decoder_residual_blocks=run.decoder_residual_blocks,
        activation=run.activation,
        output_activation=run.output_activation,
        reconstruction_loss=run.reconstruction_loss,
        ssim_weight=run.ssim_weight,
        l1_weight=run.l1_weight,
        data_variance=data_variance,
        seed=seed,
    )
    if run.model == "vqvae":
        return dict(
            embedding_dim=run.embedding_dim,
            num_embeddings=run.num_embeddings,
            commitment_cost=run.commitment_cost,
            decay=run.ema_decay,
            epsilon=run.ema_epsilon,
            codebook_init=run.codebook_init,
            l2_normalize=run.l2_normalize_codes,
            **trunk,
        )
    return dict(latent_dim=run.latent_dim, kl_beta=run.kl_beta, **trunk)


def build_model(
    run: RunConfig,
    channels: int,
    data_variance: Optional[float],
    seed: int,
    learning_rate: Optional[float] = None,
    tokens: tuple[int, tuple[int, int]] = (2, (1, 1)),
) -> keras.Model:
    """A fresh, compiled model for `run` (the dtype policy and strategy scope must already be set)."""
    model = model_class(run)(**model_arguments(run, channels, data_variance, seed, tokens))
    optimizer = keras.optimizers.Adam(learning_rate or run.learning_rate, global_clipnorm=run.gradient_clipnorm)
    model.compile(optimizer=optimizer, jit_compile=run.jit_compile, run_eagerly=run.run_eagerly)
    return model


def load_model(path: Path) -> keras.Model:
    """Load a `.keras` file in safe mode (no arbitrary code); a `CheckpointError` when it cannot be read."""
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as error:  # a truncated zip, missing entries, garbage weights: all mean "unreadable"
        text = str(error).strip()
        reason = text.splitlines()[0][:200] if text else type(error).__name__
        raise CheckpointError(f"{path} cannot be loaded ({reason})") from None


def saved_model_config(path: Path) -> Optional[dict]:
    """The `{"class_name", "config"}` record a `.keras` file stores for its model, or None if unreadable."""
    try:
        with zipfile.ZipFile(path) as archive:
            record = json.loads(archive.read("config.json"))
        return {"class_name": record["class_name"], "config": record["config"]}
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, TypeError):
        return None


def model_mismatches(saved: dict, run: RunConfig) -> list[str]:
    """Differences between a saved model's constructor arguments and what `run` would build.

    Arguments in `RESUMABLE_MODEL_ARGUMENTS` may differ. An argument the saved
    model does not record (it was saved before the argument existed) is a
    difference too: what it was trained with is unknown.
    """
    wanted_class = model_class(run)
    if saved["class_name"] != wanted_class.__name__:
        return [f"model: checkpoint {saved['class_name']!r}, config {run.model!r} ({wanted_class.__name__})"]
    mismatches = []
    ignored = (
        RESUMABLE_MODEL_ARGUMENTS | {"image_channels"} | (DERIVED_PRIOR_ARGUMENTS if run.model == "prior" else set())
    )
    for key, wanted in model_arguments(run, channels=0, data_variance=None, seed=0).items():
        if key in ignored:
            continue
        if key not in saved["config"]:
            mismatches.append(f"{key}: not recorded in the checkpoint (saved by an older version)")
            continue
        found = saved["config"][key]
        if key == "data_variance":
            key, found, wanted = "normalize_by_variance", found is not None, run.normalize_by_variance
        if isinstance(found, tuple):
            found = list(found)
        if found != wanted:
            mismatches.append(f"{key}: checkpoint {found!r}, config {wanted!r}")
    return mismatches
