"""Hostile inputs and crash safety: random bytes and configs, run lock, full disk, no pickle."""

import errno
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqvae_faces import atomic_files, callbacks, lfw_files, run_folder
from vqvae_faces.callbacks import TrainingCheckpoint, TrainingClock
from vqvae_faces.config import ConfigError, DataConfig, load_config
from vqvae_faces.errors import LockError, StorageError


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_the_decoder(data):
    result = lfw_files.decode_face(data, DataConfig(image_size=16))
    assert isinstance(result, str)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=3),
    max_leaves=8,
)
keys = st.sampled_from(
    [
        "epochs",
        "batch_size",
        "num_embeddings",
        "encoder_filters",
        "model",
        "learning_rate",
        "annealing",
        "revival",
        "image_size",
        "bogus",
        "mixed_precision",
        "max_train_minutes",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run=st.dictionaries(keys, json_values, max_size=4), data=st.dictionaries(keys, json_values, max_size=2))
def test_random_configs_give_config_errors_only(tmp_path, run, data):
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps({"runs": {"r": run}, "data": data, "compare": []}))
    try:
        config = load_config(path)
    except ConfigError as error:
        # the message names where the mistake is: a key of the run or of the data settings
        assert re.search(r"'?(runs\.r|data)[.=\[']|^runs\.r\b", str(error)), str(error)
        return
    assert config.runs["r"].num_embeddings >= 2 and config.data.image_size % config.runs["r"].downsampling_factor == 0


def test_second_trainer_of_the_same_run_is_refused(tmp_path):
    with run_folder.exclusive_run_lock(tmp_path):
        with pytest.raises(LockError, match="another process is training or evaluating it"):
            with run_folder.exclusive_run_lock(tmp_path):
                pass
    with run_folder.exclusive_run_lock(tmp_path):
        pass


class TinyModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)
        self.stop_training = False

    def call(self, x):
        return self.dense(x)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = TinyModel()
    model(keras.ops.zeros((1, 2)))
    checkpoint = TrainingCheckpoint(tmp_path, TrainingClock(total_epochs=3), patience=5)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"loss": 1.0, "val_loss": 1.0})
    good = (tmp_path / "latest.keras").read_bytes()

    def no_space(self, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", no_space)
    with pytest.raises(StorageError, match=f"cannot write {tmp_path / 'latest.keras'}: No space left on device"):
        checkpoint.on_epoch_end(1, {"loss": 0.5, "val_loss": 0.5})
    assert (tmp_path / "latest.keras").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.keras", "latest.keras", "state.json"]
    assert json.loads((tmp_path / "state.json").read_text())["epochs_done"] == 1


def test_a_loss_jump_counts_as_divergence_and_keeps_the_last_good_checkpoint(tmp_path):
    """A collapsed run has no NaN: its validation loss jumps and stays up. Past `divergence_ratio` x
    the best, the epoch is not saved, and state.json counts its time against the budget."""
    model = TinyModel()
    model(keras.ops.zeros((1, 2)))
    clock = TrainingClock(total_epochs=10)
    checkpoint = TrainingCheckpoint(tmp_path, clock, patience=5, divergence_ratio=5.0)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"loss": 0.02, "val_loss": 0.01})
    clock.previous_seconds = 60.0
    checkpoint.on_epoch_end(1, {"loss": 0.04, "val_loss": 0.045})  # 4.5x the best: a bad epoch, kept
    assert checkpoint.divergence is None and checkpoint.wait == 1
    good = (tmp_path / "latest.keras").read_bytes()
    clock.previous_seconds = 95.0
    checkpoint.on_epoch_end(2, {"loss": 0.05, "val_loss": 0.06})
    assert checkpoint.divergence == (
        "val_loss jumped to 0.06, 6.0x its best (0.01, epoch 1): training collapsed in epoch 3"
    )
    assert model.stop_training
    assert (tmp_path / "latest.keras").read_bytes() == good
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["epochs_done"] == 2 and state["best"] == 0.01 and state["train_seconds"] == 95.0


def test_without_a_divergence_ratio_only_non_finite_losses_diverge(tmp_path):
    checkpoint = TrainingCheckpoint(tmp_path, TrainingClock(total_epochs=3), patience=5)
    checkpoint.best = 0.01
    assert checkpoint.diverged({"loss": 1.0, "val_loss": 1.0}) is None
    assert checkpoint.diverged({"loss": 1.0, "val_loss": math.inf}) == "the loss became NaN or infinite"


def test_save_model_atomically_never_leaves_partial_files(tmp_path, monkeypatch):
    model = TinyModel()
    model(keras.ops.zeros((1, 2)))
    monkeypatch.setattr(atomic_files, "fsync_replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        callbacks.save_model_atomically(model, tmp_path / "best.keras")
    assert list(tmp_path.iterdir()) == []


def test_two_processes_writing_the_same_file_do_not_collide(tmp_path):
    """Two runs may build the same data cache at once: each must finish, leaving one whole file."""
    target = tmp_path / "faces.npz"
    writer = (
        "import numpy as np\nfrom vqvae_faces import atomic_files\n"
        "for i in range(40):\n"
        f"    atomic_files.save_npz_atomically({str(target)!r}, images=np.full((256, 1024), i, np.uint8))\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", writer], cwd=ROOT, stderr=subprocess.PIPE) for _ in range(2)]
    errors = [process.communicate(timeout=120)[1].decode() for process in writers]
    assert [process.returncode for process in writers] == [0, 0], errors
    with np.load(target) as saved:
        np.testing.assert_array_equal(saved["images"], np.full((256, 1024), 39, np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces.npz"]


def project_sources(root: Path) -> list[Path]:
    """The project's own .py files under `root`: not the tests, nor any virtual environment (a folder
    holding pyvenv.cfg, whatever its name) or installed packages."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [
            name
            for name in subfolders
            if name not in ("tests", "site-packages", ".git") and not (Path(folder, name) / "pyvenv.cfg").exists()
        ]
        found += [Path(folder, name) for name in files if name.endswith(".py")]
    return found


def test_the_pickle_check_reads_the_project_and_no_virtual_environment(tmp_path):
    for name in ("env-3.11", ".venv"):
        (tmp_path / name / "lib").mkdir(parents=True)
        (tmp_path / name / "pyvenv.cfg").write_text("home = /usr/bin\n")
        (tmp_path / name / "lib" / "dependency.py").write_text("import pickle\n")
    (tmp_path / "package").mkdir()
    (tmp_path / "package" / "module.py").write_text("x = 1\n")
    assert project_sources(tmp_path) == [tmp_path / "package" / "module.py"]


def test_no_pickle_anywhere_in_the_package():
    sources = project_sources(ROOT)
    assert ROOT / "vqvae_faces" / "codec.py" in sources and ROOT / "vqvae_face_main.py" in sources
    pattern = re.compile(r"\bimport pickle\b|\bcPickle\b|allow_pickle\s*=\s*True|safe_mode\s*=\s*False|\bdill\b")
    offenders = [str(p) for p in sources if pattern.search(p.read_text())]
    assert offenders == []


def test_early_stopping_after_patience_epochs_without_improvement(tmp_path):
    model = TinyModel()
    model(keras.ops.zeros((1, 2)))
    checkpoint = TrainingCheckpoint(tmp_path, TrainingClock(total_epochs=10), patience=2)
    checkpoint.set_model(model)
    # best at epoch 2 (0.5); epochs 3 and 4 do not improve on it, so training stops after epoch 4
    for epoch, loss in enumerate([1.0, 0.5, 0.6, 0.55]):
        assert not checkpoint.early_stopped, f"stopped before epoch {epoch + 1}"
        checkpoint.on_epoch_end(epoch, {"loss": loss, "val_loss": loss})
    assert checkpoint.early_stopped and model.stop_training
    state = json.loads((tmp_path / "state.json").read_text())
    assert (state["best"], state["best_epoch"], state["wait"], state["epochs_done"]) == (0.5, 2, 2, 4)
