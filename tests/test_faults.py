"""Run folders under faults: nothing deleted without --retrain, corrupt files, full disks, locks, signals.

The command line runs in-process (`vqvae_face_main.main(argv)`) on a small synthetic LFW tree,
except where a real process is the point (SIGTERM, the TensorFlow-free error path).
"""

import errno
import fcntl
import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, TINY_RUN, face_image, write_lfw_tree
from PIL import Image

import vqvae_face_main
from vqvae_faces import atomic_files

FAST = TINY_RUN + ["token_search_steps=2", "epochs=2"]


def main(out, data, *args):
    overrides = [item for setting in FAST for item in ("--set", setting)]
    return vqvae_face_main.main(["--out", str(out), "--data", str(data), "--run", "vqvae", *overrides, *args])


def run_files(out) -> dict[str, str]:
    """SHA-256 of every file under `out` (checkpoints and pictures), by relative path."""
    return {
        str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(Path(out).rglob("*"))
        if path.is_file() and path.name != "train.lock"
    }


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-epoch VQ-VAE run (best.keras, latest.keras, state, split, config, history, metrics)."""
    root = tmp_path_factory.mktemp("faults")
    tree = write_lfw_tree(root / "data")
    out = root / "out"
    assert main(out, tree) == 0
    return out, tree


@pytest.fixture
def run_copy(trained, tmp_path):
    out, tree = trained
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return copy, tree, copy / "checkpoints" / "vqvae"


# ---------------------------------------------------------------- 1. nothing deleted without --retrain


def test_a_rerun_without_latest_keras_evaluates_best_keras_and_deletes_nothing(run_copy, caplog):
    out, tree, folder = run_copy
    (folder / "latest.keras").unlink()
    (out / "images_saved" / "vqvae" / "metrics.json").unlink()
    before = run_files(folder)
    assert main(out, tree) == 0
    assert "no latest.keras to resume training from; evaluating best.keras" in caplog.text
    assert "--retrain" in caplog.text
    after = run_files(folder)
    assert {name: after[name] for name in before if not name.endswith(("tokens.npz", "test_quality.npz"))} == {
        name: digest for name, digest in before.items() if not name.endswith(("tokens.npz", "test_quality.npz"))
    }
    assert (out / "images_saved" / "vqvae" / "metrics.json").is_file(), "best.keras was evaluated"


def test_trained_epochs_without_any_model_are_refused_naming_the_files(run_copy, caplog):
    out, tree, folder = run_copy
    (folder / "latest.keras").unlink()
    (folder / "best.keras").unlink()
    before = run_files(out)
    assert main(out, tree) == 2
    message = caplog.records[-1].getMessage()
    assert "records 2 trained epochs but holds no model" in message
    for name in ("config.json", "history.csv", "split.json", "state.json"):
        assert name in message
    assert "--retrain" in message and "Traceback" not in caplog.text
    assert run_files(out) == before


def test_retrain_is_the_one_way_to_discard_a_run(run_copy):
    out, tree, folder = run_copy
    old_best = (folder / "best.keras").read_bytes()
    assert main(out, tree, "--retrain", "--set", "epochs=1") == 0
    state = json.loads((folder / "state.json").read_text())
    assert state["epochs_done"] == 1 and state["finished"]
    assert (folder / "best.keras").read_bytes() != old_best
    assert list(pd.read_csv(folder / "history.csv")["epoch"]) == [0]


# ---------------------------------------------------------------- 2. corrupt checkpoint files


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_corrupt_latest_keras_is_named_and_kept(run_copy, caplog):
    out, tree, folder = run_copy
    truncate(folder / "latest.keras")
    before = run_files(out)
    assert main(out, tree, "--set", "epochs=3") == 2
    message = caplog.records[-1].getMessage()
    assert f"{folder / 'latest.keras'} is corrupt" in message and "--retrain" in message
    assert run_files(out) == before
    caplog.clear()
    assert main(out, tree, "--eval") == 0, "best.keras still evaluates"


def test_a_corrupt_best_keras_falls_back_to_latest_keras_with_a_warning(run_copy, caplog):
    out, tree, folder = run_copy
    truncate(folder / "best.keras")
    corrupt = (folder / "best.keras").read_bytes()
    assert main(out, tree, "--eval") == 0
    assert f"{folder / 'best.keras'} cannot be loaded" in caplog.text
    assert f"evaluating {folder / 'latest.keras'}" in caplog.text
    assert (folder / "best.keras").read_bytes() == corrupt, "the corrupt file is left for the user"


def test_both_models_corrupt_is_a_one_line_error(run_copy, caplog):
    out, tree, folder = run_copy
    truncate(folder / "best.keras")
    (folder / "latest.keras").write_bytes(b"not a zip file")
    assert main(out, tree, "--eval") == 2
    assert "no loadable model for run 'vqvae'" in caplog.records[-1].getMessage()


def test_a_corrupt_state_json_is_recovered_from_latest_keras(run_copy, caplog):
    out, tree, folder = run_copy
    (folder / "state.json").write_text('{"epochs_done": 2, "be')
    assert main(out, tree, "--set", "epochs=3") == 0
    assert "state.json is corrupt" in caplog.text
    assert "resuming run vqvae from epoch 2" in caplog.text
    (kept,) = folder.glob("state.json.corrupt-*")
    assert kept.read_text() == '{"epochs_done": 2, "be'
    assert json.loads((folder / "state.json").read_text())["epochs_done"] == 3
    assert list(pd.read_csv(folder / "history.csv")["epoch"]) == [0, 1, 2]


def test_a_corrupt_config_json_is_moved_aside_and_the_model_settings_still_checked(run_copy, caplog):
    out, tree, folder = run_copy
    (folder / "config.json").write_bytes(b"\x00\xff garbage")
    assert main(out, tree, "--eval", "--set", "num_embeddings=32") == 2
    assert "num_embeddings: checkpoint 16, config 32" in caplog.records[-1].getMessage()
    (kept,) = folder.glob("config.json.corrupt-*")
    assert kept.read_bytes() == b"\x00\xff garbage"
    caplog.clear()
    assert main(out, tree, "--eval") == 0


def test_a_corrupt_split_json_is_a_one_line_error(run_copy, caplog):
    out, tree, folder = run_copy
    (folder / "split.json").write_text('{"train": ["a"')
    before = run_files(out)
    assert main(out, tree, "--eval") == 2
    message = caplog.records[-1].getMessage()
    assert "split.json" in message and "is corrupt" in message and "--test-data" in message
    assert run_files(out) == before


def test_a_torn_history_csv_is_moved_aside_and_training_resumes(run_copy, caplog):
    out, tree, folder = run_copy
    with open(folder / "history.csv", "ab") as handle:
        handle.write(b"2,0.0\xff\xfe")
    assert main(out, tree, "--set", "epochs=3") == 0
    assert "history.csv is unreadable" in caplog.text
    assert len(list(folder.glob("history.csv.corrupt-*"))) == 1
    assert list(pd.read_csv(folder / "history.csv")["epoch"]) == [2]


# ---------------------------------------------------------------- 8. other data under the same names


def test_other_images_under_the_same_names_are_refused_unless_given_as_test_data(trained, tmp_path, caplog):
    out, tree = trained
    other = tmp_path / "lfw"
    shutil.copytree(tree, other)
    for path in other.rglob("*_0001.jpg"):
        Image.fromarray(255 - face_image(hash(path.name) % 1000)).save(path)
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    assert main(copy, other, "--eval") == 2
    message = caplog.records[-1].getMessage()
    assert "differ from those in" in message and str(other) in message and str(tree) in message
    caplog.clear()
    assert main(copy, tree, "--eval", "--test-data", str(other)) == 0


# ---------------------------------------------------------------- 11. locks


def test_evaluation_waits_for_no_trainer_and_a_trainer_for_no_evaluation(run_copy, caplog):
    out, tree, folder = run_copy
    with open(folder / "train.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.truncate(0)
        handle.write("4242")
        handle.flush()
        assert main(out, tree, "--eval") == 2
        assert "cannot evaluate run folder" in caplog.text and "training it (pid 4242)" in caplog.text
        fcntl.flock(handle, fcntl.LOCK_UN)
        caplog.clear()
        fcntl.flock(handle, fcntl.LOCK_SH)
        assert main(out, tree, "--set", "epochs=3") == 2
        assert "cannot train run folder" in caplog.text and "training or evaluating it" in caplog.text
        fcntl.flock(handle, fcntl.LOCK_UN)
    assert json.loads((folder / "state.json").read_text())["epochs_done"] == 2


def test_a_lock_that_the_file_system_refuses_is_not_blamed_on_another_process(run_copy, caplog, monkeypatch):
    out, tree, _ = run_copy

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert main(out, tree, "--eval") == 2
    message = caplog.records[-1].getMessage()
    assert "No locks available" in message and "another process" not in message


# ---------------------------------------------------------------- 13-15. dependencies, JSON, fast errors


def test_keras_is_pinned_past_the_safe_mode_bypasses():
    import keras

    line = next(line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("keras"))
    floor = tuple(int(part) for part in re.search(r">=([\d.]+)", line).group(1).split("."))
    assert floor >= (3, 14)
    assert tuple(int(part) for part in keras.__version__.split(".")[:2]) >= (3, 14)


def test_an_infinite_psnr_is_written_as_valid_json(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_files.write_json_atomically({"psnr": float("inf"), "nested": [np.float32("nan"), 1.5], "n": 3}, path)

    def refuse(constant):
        raise ValueError(f"invalid JSON constant {constant}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"psnr": None, "nested": [None, 1.5], "n": 3}


CONFIG_MISTAKES = [
    (["--set", "bogus_key=1"], "--set bogus_key: unknown key 'bogus_key'"),
    (["--set", "data.bogus=1"], "unknown key 'data.bogus'"),
    (["--set", "epochs=many"], "runs.vqvae.epochs"),  # not JSON: a string where a number goes
    (["--set", 'epochs="3"'], "runs.vqvae.epochs"),  # JSON, of the wrong type
    (["--set", "batch_size=2.5"], "runs.vqvae.batch_size"),
    (["--set", "learning_rate=2"], "runs.vqvae.learning_rate=2"),  # out of range
    (["--set", "data.image_size=17"], "data.image_size=17"),
    (["--set", "annealing.factor=-1"], "annealing.factor"),
    (["--set", 'activation="tanh"'], "activation"),
    (["--set", "encoder_filters=[8]"], "decoder_filters"),  # the two lists must mirror each other
    (["--set", "decay=2"], "runs.vqvae.decay=2"),
    (["--config", "{folder}/broken.json"], "broken.json"),  # not JSON at all
    (["--data", "missing.tgz"], "does not exist"),
    (["--run", "nope"], "--run 'nope'"),
]


def test_config_and_path_mistakes_are_reported_before_tensorflow_loads(tmp_path):
    """Every kind of mistake in one program (no TensorFlow to load, so a second each): one line, exit
    2, nothing written, and TensorFlow never imported."""
    (tmp_path / "broken.json").write_text('{"runs": {"vqvae": {"epochs": 2,}}}')
    out = tmp_path / "out"
    script = (
        "import json, logging, sys, vqvae_face_main\n"
        "results = []\n"
        f"for args in {[[a.format(folder=tmp_path) for a in args] for args, _ in CONFIG_MISTAKES]!r}:\n"
        f"    results.append(vqvae_face_main.main(['--out', {str(out)!r}, '--run', 'vqvae', *args]))\n"
        "    print('=====', file=sys.stderr, flush=True)\n"
        "print(json.dumps({'codes': results, 'tensorflow': 'tensorflow' in sys.modules}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"codes": [2] * len(CONFIG_MISTAKES), "tensorflow": False}
    for (args, message), printed in zip(CONFIG_MISTAKES, result.stderr.split("=====")[:-1]):
        lines = [line for line in printed.strip().splitlines() if line]
        assert len(lines) == 1 and message in lines[0] and "ERROR" in lines[0], (args, printed)
    assert not out.exists()


def test_train_images_per_second_is_written_with_meaning(trained):
    """The throughput the run measured (the epochs after the first: training images over their batches' time)
    is the same in state.json, metrics.json and the last row of history.csv, absent from the first row, and
    at least the training images of one epoch over the time from the split's writing to the last row's."""
    out, _ = trained
    folder = out / "checkpoints" / "vqvae"
    state = json.loads((folder / "state.json").read_text())
    metrics = json.loads((out / "images_saved" / "vqvae" / "metrics.json").read_text())
    history = pd.read_csv(folder / "history.csv")
    rate = state["train_images_per_second"]
    assert rate == metrics["train_images_per_second"] == pytest.approx(history["images_per_second"].iloc[-1])
    assert np.isnan(history["images_per_second"].iloc[0]) and len(history) == 2
    train_images = len(json.loads((folder / "split.json").read_text())["train"])
    elapsed = (folder / "history.csv").stat().st_mtime - (folder / "split.json").stat().st_mtime
    assert train_images / elapsed <= rate
