"""Run settings to models: the one mapping to constructor arguments, building, loading, compatibility.

A model's settings carry the names of its constructor's arguments (`config.VQVAEConfig`,
`VAEConfig`, `TransformerConfig`, `PixelCNNConfig`), so the mapping is mechanical: a new
model setting is a settings field and a constructor argument of the same name. Compatibility
with saved checkpoints follows from the constructor arguments every `.keras` file stores.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import zipfile
from pathlib import Path
from typing import Optional

import keras

from vqvae_class_keras import VQVAE
from vqvae_faces.config import PriorRunConfig, RunConfig
from vqvae_faces.errors import CheckpointError
from vqvae_faces.gaussian_vae import VAE
from vqvae_faces.token_prior import CausalTransformer, GatedPixelCNN

# Constructor arguments of a saved model that may differ from the current settings when it is
# resumed or evaluated: the quantizer's training policy, the seed of its random draws and a prior's
# dropout (set anew on resuming). Every other argument is architecture or training objective and
# must match (see `model_mismatches`).
RESUMABLE_MODEL_ARGUMENTS = frozenset({"commitment_cost", "decay", "epsilon", "codebook_init", "seed", "dropout"})
# Constructor arguments added after models were saved without them, with the value that gives what those
# models did: a checkpoint that does not record one was trained with it.
ADDED_ARGUMENTS = {"rate_lambda": 0.0}
MODEL_CLASSES = {"vqvae": VQVAE, "vae": VAE}
# Weights AdamW leaves undecayed, by name: biases and layer normalisation's scale and offset.
NOT_DECAYED = ["bias", "gamma", "beta"]
PRIOR_CLASSES = {"transformer": CausalTransformer, "pixelcnn": GatedPixelCNN}
# A prior's token alphabet follows from its VQ-VAE run, whose checkpoint the prior's
# config.json records (see `run_folder.check_compatible`); the rest of its arguments must match.
DERIVED_PRIOR_ARGUMENTS = frozenset({"num_embeddings", "grid_size"})


def model_class(run: RunConfig) -> type:
    """The Keras model class a run trains."""
    return PRIOR_CLASSES[run.architecture] if isinstance(run, PriorRunConfig) else MODEL_CLASSES[run.model]


def _constructor_parameters(cls: type) -> list[str]:
    """The named arguments of `cls`'s constructor, with those it passes on to its bases' (**kwargs)."""
    names = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("keras"):
            break
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]  # without self
        names += [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return list(dict.fromkeys(names))


def model_arguments(
    run: RunConfig,
    channels: int,
    data_variance: Optional[float],
    seed: int,
    tokens: tuple[int, tuple[int, int]] = (2, (1, 1)),
) -> dict:
    """The constructor arguments of `model_class(run)`: each setting of the same name, and what the data
    decides: the image `channels`, the training faces' `data_variance` (when `normalize_by_variance`), the
    `seed`, and a prior's `tokens` (K, (rows, columns)) from `ExperimentConfig.token_alphabet`."""
    cls = model_class(run)
    if isinstance(run, PriorRunConfig):
        settings = dataclasses.asdict(getattr(run, run.architecture))
        num_embeddings, grid_size = tokens
        settings.update(num_embeddings=num_embeddings, grid_size=list(grid_size))
    else:
        settings = dict(vars(run), image_channels=channels, data_variance=data_variance, seed=seed)
    arguments = {name: settings[name] for name in _constructor_parameters(cls) if name in settings}
    return {name: list(value) if isinstance(value, tuple) else value for name, value in arguments.items()}


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
    learning_rate = learning_rate or run.learning_rate
    if run.weight_decay:
        optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=run.weight_decay)
    else:
        optimizer = keras.optimizers.Adam(learning_rate)
    model.compile(optimizer=optimizer, jit_compile=run.jit_compile, run_eagerly=run.run_eagerly)
    apply_training_policy(model, run, learning_rate)
    return model


def apply_training_policy(model: keras.Model, run: RunConfig, learning_rate: float) -> None:
    """Set what a run may change when it resumes: the learning rate, the gradient clipping, a prior's
    dropout, the weight decay and what it spares (biases and layer-norm scales and offsets, which `.keras`
    files do not record), and how the step runs (`jit_compile`, `run_eagerly`, this session's choice)."""
    model.jit_compile, model.run_eagerly = run.jit_compile, run.run_eagerly
    model.optimizer.learning_rate.assign(learning_rate)
    # Under mixed_float16 the optimizer is a LossScaleOptimizer: clipping and decay belong to the one inside,
    # which sees the unscaled gradients.
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    optimizer.global_clipnorm = run.gradient_clipnorm
    if isinstance(run, PriorRunConfig) and hasattr(model, "set_dropout"):
        model.set_dropout(run.transformer.dropout)
    if isinstance(optimizer, keras.optimizers.AdamW):
        optimizer.weight_decay = run.weight_decay
        optimizer.exclude_from_weight_decay(var_names=NOT_DECAYED)


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
    difference too, what it was trained with being unknown, unless
    `ADDED_ARGUMENTS` gives the value it had.
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
        if key not in saved["config"] and key not in ADDED_ARGUMENTS:
            mismatches.append(f"{key}: not recorded in the checkpoint (saved by an older version)")
            continue
        found = saved["config"].get(key, ADDED_ARGUMENTS.get(key))
        if key == "data_variance":
            key, found, wanted = "normalize_by_variance", found is not None, run.normalize_by_variance
        if isinstance(found, tuple):
            found = list(found)
        if found != wanted:
            mismatches.append(f"{key}: checkpoint {found!r}, config {wanted!r}")
    return mismatches
