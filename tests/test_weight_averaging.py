"""`weight_ema_momentum`: Adam keeps a moving average of the weights; validation and evaluation use it."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, TINY_RUN

import face_data
import trainer
from vqvae_config import load_config

MOMENTUM = 0.5  # far from 1, so that the average and the last weights differ clearly after a few steps


def test_evaluation_loads_the_moving_average_and_training_resumes_from_the_raw_weights(tmp_path):
    """Oracle: a_1 = w_1, a_t = m a_(t-1) + (1 - m) w_t over the weights after each optimizer step."""
    config = load_config(ROOT / "experiment.json", TINY_RUN + [f"weight_ema_momentum={MOMENTUM}"], ["vqvae"])
    model = trainer.build_model(config.runs["vqvae"], 3, None, seed=3)
    model.build((None, 16, 16, 3))
    images = np.random.default_rng(0).uniform(size=(64, 16, 16, 3)).astype(np.float32)
    after_each_step = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: after_each_step.append([v.numpy() for v in model.trainable_variables]),
        on_epoch_end=lambda epoch, logs: model.save(tmp_path / "checkpoint.keras"),  # as TrainingCheckpoint does
    )
    model.fit(images, epochs=1, batch_size=16, shuffle=False, callbacks=[record], verbose=0)
    assert len(after_each_step) == 4
    average = after_each_step[0]
    for weights in after_each_step[1:]:
        average = [MOMENTUM * a + (1 - MOMENTUM) * w for a, w in zip(average, weights)]

    raw = trainer.load_model(tmp_path / "checkpoint.keras")
    for loaded, last in zip(raw.trainable_variables, after_each_step[-1]):
        np.testing.assert_allclose(loaded.numpy(), last, rtol=1e-6, atol=1e-7)
    averaged = trainer.load_averaged_model(tmp_path / "checkpoint.keras")
    for loaded, expected, last in zip(averaged.trainable_variables, average, after_each_step[-1]):
        np.testing.assert_allclose(loaded.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert max(np.abs(a - w).max() for a, w in zip(average, after_each_step[-1])) > 1e-4, "the oracle must tell them apart"


def test_validation_loss_is_measured_on_the_averaged_weights(lfw_tree, tmp_path):
    """The logged validation reconstruction loss is what the averaged checkpoint scores on the validation
    faces (not the total loss: annealing changes the commitment cost after validation)."""
    overrides = TINY_RUN + [f"data.path={json.dumps(str(lfw_tree))}", "batch_size=4", "patience=100"]
    config = load_config(None, overrides + [f"weight_ema_momentum={MOMENTUM}"], ["vqvae"])
    faces = face_data.load_faces(config.data, tmp_path / "cache", [])
    trainer.train_run(config, "vqvae", faces, tmp_path)
    run_dir = tmp_path / "checkpoints" / "vqvae"
    logged = pd.read_csv(run_dir / "history.csv")["val_reconstruction_loss"].iloc[-1]
    val_images = faces.subset(face_data.load_split(run_dir / "split.json", faces)["val"])
    val = face_data.make_dataset(val_images, 4)
    averaged = trainer.load_averaged_model(run_dir / "latest.keras").evaluate(val, verbose=0, return_dict=True)
    raw = trainer.load_model(run_dir / "latest.keras").evaluate(val, verbose=0, return_dict=True)
    assert averaged["reconstruction_loss"] == pytest.approx(logged, rel=1e-5)
    assert abs(raw["reconstruction_loss"] - logged) > 1e-4 * logged, "the raw weights score differently"
