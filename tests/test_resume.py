"""Exact resume: a run killed with SIGKILL after its first checkpoint and then rerun with the
same command ends with the same weights, optimizer state, codebook and history as a run
that was never interrupted."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pandas as pd
import pytest
from conftest import COMPILED, ROOT, TINY_RUN

import vqvae_face_main
from vqvae_faces import callbacks, lfw_files, model_settings, run_folder, training
from vqvae_faces.callbacks import LossDiverged, TrainingCheckpoint, TrainingError
from vqvae_faces.config import ConfigError, load_config

# Several batches per epoch, augmentation and revival on, the compiled train step, deterministic ops, no time budget
# (a time budget makes the learning rate follow the wall clock).
EPOCHS = 4
SETTINGS = (
    TINY_RUN
    + COMPILED
    + [
        f"epochs={EPOCHS}",
        "batch_size=4",
        "deterministic=true",
        "data.augmentation.enabled=true",
        "data.augmentation.probability=0.5",
    ]
)


def arguments(lfw_tree, out):
    overrides = [arg for setting in SETTINGS for arg in ("--set", setting)]
    return ["--run", "vqvae", "--data", str(lfw_tree), "--out", str(out), *overrides]


def weights(path):
    """Every array in a .keras file's weights (model and optimizer), by name."""
    import h5py

    arrays = {}
    with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as handle, h5py.File(handle) as store:
        store.visititems(lambda name, item: arrays.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None)
    return arrays


def kill_after_first_checkpoint(lfw_tree, out):
    """Start a real run, SIGKILL it as soon as its first latest.keras exists; return how far it got."""
    latest = out / "checkpoints" / "vqvae" / "latest.keras"
    log = open(out.parent / "killed.log", "w")
    command = [sys.executable, str(ROOT / "vqvae_face_main.py"), *arguments(lfw_tree, out)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    log.close()
    assert latest.exists(), (out.parent / "killed.log").read_text()[-3000:]
    return pd.read_csv(out / "checkpoints" / "vqvae" / "history.csv")


def test_sigkill_then_rerun_matches_an_uninterrupted_run(lfw_tree, tmp_path, caplog):
    """The killed run is a real process; the rerun and the uninterrupted reference run the same
    command line in this process."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    partial_history = kill_after_first_checkpoint(lfw_tree, killed)
    assert len(partial_history) < EPOCHS, "the kill must land before the run ends"
    caplog.set_level("INFO")
    assert vqvae_face_main.main(arguments(lfw_tree, whole)) == 0

    leftover = killed / "checkpoints" / "vqvae" / "best.partial.4242.keras"
    leftover.write_bytes(b"half a zip file")  # as a kill during a save leaves it
    caplog.clear()
    assert vqvae_face_main.main(arguments(lfw_tree, killed)) == 0
    assert "resuming run vqvae from epoch" in caplog.text
    assert not leftover.exists()

    expected = weights(whole / "checkpoints" / "vqvae" / "latest.keras")
    actual = weights(killed / "checkpoints" / "vqvae" / "latest.keras")
    assert expected.keys() == actual.keys()
    assert any("vector_quantizer_ema" in name for name in expected) and any("optimizer" in name for name in expected)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)  # bit for bit

    history = {out.name: pd.read_csv(out / "checkpoints" / "vqvae" / "history.csv") for out in (whole, killed)}
    assert list(history["killed"]["epoch"]) == list(range(EPOCHS)), "no epoch logged twice or lost"
    # The logged values are epoch means that Keras accumulates in float32 metric variables; they may
    # round differently in their last bit, so they get a tolerance of one float32 ulp.
    for column in ("loss", "val_loss", "perplexity", "revived_codes", "commitment_cost", "learning_rate"):
        np.testing.assert_allclose(history["killed"][column], history["whole"][column], rtol=2e-7, err_msg=column)


def test_a_state_json_one_write_behind_latest_keras_yields_to_the_counters_inside_it(tmp_path, caplog):
    """A kill between writing latest.keras and state.json leaves state.json an epoch behind."""
    config = load_config(None, TINY_RUN, ["vqvae"])
    paths = run_folder.RunPaths.for_run(tmp_path, "vqvae")
    model = model_settings.build_model(config.runs["vqvae"], 3, None, 0)
    model.build((None, 16, 16, 3))
    inside = {"epochs_done": 3, "best": 0.5, "best_epoch": 3, "wait": 0, "train_seconds": 30.0, "finished": False}
    callbacks.save_model_atomically(model, paths.latest_model, inside)
    paths.state.write_text(json.dumps({**inside, "epochs_done": 2, "train_seconds": 20.0}))
    caplog.set_level("INFO")
    assert run_folder.resumable_state(paths) == inside
    assert "using latest.keras" in caplog.text
    paths.state.write_text(json.dumps(inside))
    assert run_folder.resumable_state(paths) == inside


def test_resume_under_mixed_bfloat16_repeats_an_uninterrupted_run(lfw_tree, tmp_path, caplog):
    """On the CPU too: a bf16 run stopped after one epoch and resumed ends with the weights of one run
    that trained both epochs."""
    settings = ["mixed_precision=mixed_bfloat16", "deterministic=true", "batch_size=4"]  # eager (TINY_RUN)
    settings += ["data.augmentation.enabled=true"]  # the augmentation layers compute in float32 under bf16
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    caplog.set_level("INFO")
    faces = lfw_files.load_faces(tiny_config(lfw_tree).data, tmp_path / "cache", [])
    training.train_run(tiny_config(lfw_tree, *settings, "epochs=2"), "vqvae", faces, whole)
    training.train_run(tiny_config(lfw_tree, *settings, "epochs=1"), "vqvae", faces, resumed)
    training.train_run(tiny_config(lfw_tree, *settings, "epochs=2"), "vqvae", faces, resumed)
    expected = weights(whole / "checkpoints" / "vqvae" / "latest.keras")
    actual = weights(resumed / "checkpoints" / "vqvae" / "latest.keras")
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    assert caplog.text.count("run vqvae: vqvae, mixed_bfloat16") == 3, "every session trained under bf16"


def tiny_config(lfw_tree, *overrides):
    return load_config(None, [f"data.path={json.dumps(str(lfw_tree))}", *TINY_RUN, *overrides], ["vqvae"])


def test_nan_loss_retries_from_the_checkpoint_with_a_lower_learning_rate(lfw_tree, tmp_path, monkeypatch, caplog):
    """The first attempt diverges after writing its first checkpoint; the retry resumes at half the rate."""
    config = tiny_config(
        lfw_tree, "epochs=3", "learning_rate=0.002", "divergence_retries=1", "divergence_lr_factor=0.5"
    )
    faces = lfw_files.load_faces(config.data, tmp_path / "cache", [])
    real_fit, rates = training._fit, []

    def diverge_once(model, job):
        rates.append((job.run.learning_rate, float(model.optimizer.learning_rate.numpy())))
        if len(rates) == 1:
            real_fit(model, dataclasses.replace(job, run=dataclasses.replace(job.run, epochs=1)))
            raise LossDiverged("the loss became NaN or infinite in epoch 2 (simulated).")
        return real_fit(model, job)

    monkeypatch.setattr(training, "_fit", diverge_once)
    training.train_run(config, "vqvae", faces, tmp_path)
    assert [rate for rate, _ in rates] == [2e-3, 1e-3]
    assert rates[1][1] == pytest.approx(1e-3), "the resumed optimizer uses the lowered rate"
    assert "Retry 1 of 1: resuming from it with learning_rate 0.001" in caplog.text
    state = json.loads((tmp_path / "checkpoints" / "vqvae" / "state.json").read_text())
    assert state["finished"] and state["epochs_done"] == 3


def test_a_collapse_in_a_real_run_resumes_from_the_last_good_epoch(lfw_tree, tmp_path, monkeypatch, caplog):
    """Epoch 2's validation loss reads 10x the best once: the run resumes from epoch 1 at half the rate."""
    config = tiny_config(lfw_tree, "epochs=3", "learning_rate=0.002", "divergence_ratio=3")
    faces = lfw_files.load_faces(config.data, tmp_path / "cache", [])
    real_epoch_end, seen = TrainingCheckpoint.on_epoch_end, []

    def collapse_once(self, epoch, logs=None):
        seen.append(epoch)
        if seen == [0, 1]:
            logs = {**logs, "val_loss": 10 * self.best}
        return real_epoch_end(self, epoch, logs)

    monkeypatch.setattr(TrainingCheckpoint, "on_epoch_end", collapse_once)
    training.train_run(config, "vqvae", faces, tmp_path)
    assert seen == [0, 1, 1, 2], "epoch 2 is trained again after the retry"
    assert "10.0x its best" in caplog.text and "training collapsed in epoch 2" in caplog.text
    assert "resuming from it with learning_rate 0.001" in caplog.text
    state = json.loads((tmp_path / "checkpoints" / "vqvae" / "state.json").read_text())
    assert state["finished"] and state["epochs_done"] == 3


def test_a_resumed_run_steps_as_this_session_says_not_as_its_checkpoint_was_compiled(lfw_tree, tmp_path, monkeypatch):
    """The checkpoint records how its model was compiled; run_eagerly and jit_compile are the rerun's."""
    faces = lfw_files.load_faces(tiny_config(lfw_tree).data, tmp_path / "cache", [])
    real_fit, modes = training._fit, []

    def record(model, job):
        modes.append((model.run_eagerly, model.jit_compile))
        return real_fit(model, job)

    monkeypatch.setattr(training, "_fit", record)
    training.train_run(tiny_config(lfw_tree, "epochs=1"), "vqvae", faces, tmp_path)
    training.train_run(tiny_config(lfw_tree, "epochs=2", *COMPILED), "vqvae", faces, tmp_path)
    assert modes == [(True, False), (False, False)]
    state = json.loads((tmp_path / "checkpoints" / "vqvae" / "state.json").read_text())
    assert state["epochs_done"] == 2


def test_nan_loss_after_the_last_retry_is_a_clear_error(lfw_tree, tmp_path, monkeypatch):
    config = tiny_config(lfw_tree, "learning_rate=0.002", "divergence_retries=2", "divergence_lr_factor=0.1")
    faces = lfw_files.load_faces(config.data, tmp_path / "cache", [])
    rates = []

    def always_diverge(model, job):
        rates.append(job.run.learning_rate)
        raise LossDiverged("the loss became NaN or infinite in epoch 1 (simulated).")

    monkeypatch.setattr(training, "_fit", always_diverge)
    with pytest.raises(TrainingError, match="NaN or infinite"):
        training.train_run(config, "vqvae", faces, tmp_path)
    np.testing.assert_allclose(rates, [2e-3, 2e-4, 2e-5])


def rewrite_model_config(path, edit):
    """Rewrite the model record inside a .keras file (as an older version of the package wrote it)."""
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    record = json.loads(entries["config.json"])
    edit(record["config"])
    entries["config.json"] = json.dumps(record).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


def test_compatibility_comes_from_the_model_saved_in_the_checkpoint(tmp_path):
    """The constructor arguments inside latest.keras are compared with the settings: architecture and
    objective must match, the quantizer's training policy may change, and a checkpoint saved before a
    setting existed is refused with a message naming it (what it was trained with is unknown)."""
    config = load_config(None, TINY_RUN, ["vqvae"])
    paths = run_folder.RunPaths.for_run(tmp_path, "vqvae")
    model = model_settings.build_model(config.runs["vqvae"], 3, None, 0)
    model.build((None, 16, 16, 3))
    callbacks.save_model_atomically(model, paths.latest_model)
    run_folder.check_compatible(paths, config, "vqvae")
    run_folder.check_compatible(paths, load_config(None, TINY_RUN + ["decay=0.9", "seed=7"], ["vqvae"]), "vqvae")
    relu = load_config(None, TINY_RUN + ["activation=relu"], ["vqvae"])
    with pytest.raises(ConfigError, match="activation: checkpoint 'silu', config 'relu'"):
        run_folder.check_compatible(paths, relu, "vqvae")
    wider = load_config(None, TINY_RUN + ["embedding_dim=8"], ["vqvae"])
    with pytest.raises(ConfigError, match="embedding_dim: checkpoint 4, config 8"):
        run_folder.check_compatible(paths, wider, "vqvae")
    vae = dataclasses.replace(config, runs={"vqvae": dataclasses.replace(config.runs["vqvae"], model="vae")})
    with pytest.raises(ConfigError, match="model: checkpoint 'VQVAE', config 'vae'"):
        run_folder.check_compatible(paths, vae, "vqvae")

    def drop_l1_weight(saved):
        del saved["l1_weight"]

    rewrite_model_config(paths.latest_model, drop_l1_weight)
    with pytest.raises(ConfigError, match=r"l1_weight: not recorded in the checkpoint \(saved by an older version\)"):
        run_folder.check_compatible(paths, config, "vqvae")


def test_a_real_nan_keeps_the_last_good_epoch_and_exits_2_when_the_retries_run_out(
    lfw_tree, tmp_path, monkeypatch, caplog
):
    """No stand-in for the training: one clean epoch, then a rerun for three whose faces are poisoned
    with NaN pixels. The real train step's loss turns NaN, the retry at half the rate meets it too,
    the command line ends with one line and exit 2, and latest.keras still holds the clean epoch."""
    from vqvae_faces import pipeline

    args = ["--run", "vqvae", "--data", str(lfw_tree), "--out", str(tmp_path)]
    args += [item for setting in TINY_RUN for item in ("--set", setting)]
    assert vqvae_face_main.main([*args, "--set", "epochs=1"]) == 0
    latest = tmp_path / "checkpoints" / "vqvae" / "latest.keras"
    good = weights(latest)
    real_scaled = pipeline._scaled
    monkeypatch.setattr(pipeline, "_scaled", lambda pool, index: real_scaled(pool, index) * float("nan"))
    caplog.set_level("INFO")
    assert vqvae_face_main.main([*args, "--set", "epochs=3", "--set", "divergence_retries=1"]) == 2
    assert "Retry 1 of 1: resuming from it with learning_rate" in caplog.text
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and "NaN or infinite" in errors[0] and "Traceback" not in caplog.text
    assert json.loads(zipfile.ZipFile(latest).read("training_state.json"))["epochs_done"] == 1
    kept = weights(latest)
    assert kept.keys() == good.keys()
    for name in good:
        np.testing.assert_array_equal(kept[name], good[name], err_msg=name)
