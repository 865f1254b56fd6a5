"""Faults of whole runs in real conditions: a full disk at every write, and SIGTERM from a scheduler.

Kept apart from `test_faults.py` so the two long tests run beside the others on a second worker.
"""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import PEOPLE, ROOT, write_lfw_tree
from test_faults import FAST, info_logs, main  # noqa: F401  (info_logs is an autouse fixture)

import vqvae_face_main
from vqvae_faces import atomic_files
from vqvae_faces.errors import Terminated


def assert_whole(folder: Path) -> None:
    """Every file the program wrote is complete: no partial files, every format parses."""
    assert not list(folder.rglob("*.partial.*"))
    for path in folder.rglob("*"):
        if path.suffix == ".keras":
            assert zipfile.ZipFile(path).testzip() is None, path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".csv":
            pd.read_csv(path)
        elif path.suffix == ".npz":
            with np.load(path) as arrays:
                list(arrays.values())


def test_a_full_disk_or_no_permission_at_any_write_ends_in_one_line_and_the_next_run_resumes(
    tmp_path, monkeypatch, caplog
):
    tree = write_lfw_tree(tmp_path / "data", people=PEOPLE[:5], per_person=2)
    out = tmp_path / "out"
    real_replace = atomic_files.fsync_replace
    failing = {"name": None, "errno": errno.ENOSPC}

    def replace(tmp, final):
        if failing["name"] and re.fullmatch(failing["name"], Path(final).name):
            raise OSError(failing["errno"], os.strerror(failing["errno"]))
        real_replace(tmp, final)

    monkeypatch.setattr(atomic_files, "fsync_replace", replace)
    steps = [
        (r"faces-.*\.npz", []),
        ("split.json", []),
        ("config.json", []),
        ("history.csv", []),
        ("latest.keras", []),
        ("best.keras", []),
        ("state.json", []),
        ("training_curves.png", []),
        ("tokens.npz", []),
        ("test_quality.npz", []),
        ("metrics.json", []),
        ("reconstructions.png", []),
        ("codebook_usage.png", []),
        ("comparison.csv", ["--compare"]),
        ("report.html", ["--compare"]),
    ]
    # every write refused by a full disk, and two by a folder the user may not write to
    steps = [(name, args, errno.ENOSPC) for name, args in steps]
    steps += [("metrics.json", [], errno.EACCES), ("comparison.csv", ["--compare"], errno.EACCES)]
    for name, args, number in steps:
        failing.update(name=name, errno=number)
        caplog.clear()
        assert main(out, tree, "--set", "epochs=1", *args) == 2, name
        message = caplog.records[-1].getMessage()
        assert message.startswith("cannot write ") and os.strerror(number) in message, message
        written = re.match(rf"cannot write (.*?): {os.strerror(number)}", message).group(1)
        assert re.fullmatch(name, Path(written).name), (name, written)
        assert "Traceback" not in caplog.text
        # the error as text: a record holding the exception keeps its traceback's models alive with the record
        assert not any(isinstance(arg, BaseException) for record in caplog.records for arg in record.args or ())
        assert_whole(out)
    failing["name"] = None
    caplog.clear()
    assert main(out, tree, "--set", "epochs=2", "--compare") == 0
    assert "resuming run vqvae from epoch 1" in caplog.text
    assert json.loads((out / "checkpoints" / "vqvae" / "state.json").read_text())["epochs_done"] == 2
    assert (out / "images_saved" / "compare" / "report.html").is_file()


@pytest.mark.parametrize("blocked", ["tensorboard", "tensorboard/reconstructions"])
def test_tensorboard_logs_that_cannot_be_written_end_in_one_line_and_the_next_run_resumes(tmp_path, caplog, blocked):
    """TensorBoard writes through TensorFlow, not `atomic_files`: a file where its folder (the scalars') or its
    images' subfolder should be stops the run with the one line of every other write, and the same command
    trains the run once the way is clear."""
    tree = write_lfw_tree(tmp_path / "data", people=PEOPLE[:5], per_person=2)
    out = tmp_path / "out"
    obstacle = out / "checkpoints" / "vqvae" / blocked
    obstacle.parent.mkdir(parents=True)
    obstacle.write_text("a file where TensorBoard's folder should be")
    assert main(out, tree, "--set", "epochs=1", "--set", "snapshot_every=1") == 2
    message = caplog.records[-1].getMessage()
    assert message.startswith(f"cannot write {obstacle}: ")
    assert re.search(r"not a directory\. Files written before", message, re.IGNORECASE), message
    assert "Traceback" not in caplog.text and "{{" not in message
    assert_whole(out)
    obstacle.unlink()
    assert main(out, tree, "--set", "epochs=1", "--set", "snapshot_every=1") == 0
    assert list((out / "checkpoints" / "vqvae" / blocked).rglob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    "sent, code, said", [(signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_signal_keeps_the_last_epoch_exits_with_its_status_and_the_run_resumes(tmp_path, caplog, sent, code, said):
    """SIGTERM from a scheduler, SIGINT from Ctrl-C."""
    tree = write_lfw_tree(tmp_path / "data", people=PEOPLE[:5], per_person=2)
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "vqvae_face_main.py"), "--out", str(out), "--data", str(tree)]
    command += ["--run", "vqvae"] + [item for s in FAST + ["epochs=500"] for item in ("--set", s)]
    # A shell starts background jobs with SIGINT ignored, and a child keeps that: give the program Ctrl-C's
    # default disposition, whatever started the tests.
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    latest = out / "checkpoints" / "vqvae" / "latest.keras"
    deadline = time.monotonic() + 120
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(sent)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr[-2000:]
    assert said in stderr and "Traceback" not in stderr
    done = json.loads(zipfile.ZipFile(latest).read("training_state.json"))["epochs_done"]
    assert 1 <= done < 500
    caplog.set_level("INFO")
    assert main(out, tree, "--set", f"epochs={done + 1}") == 0  # the same command, in this process
    assert f"resuming run vqvae from epoch {done}" in caplog.text


@pytest.mark.parametrize("sent, raised", [(signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_that_lands_in_a_finalizer_is_sent_again_not_lost(monkeypatch, sent, raised):
    """Python drops an exception raised inside __del__: the handler must not raise there (a Ctrl-C that
    landed in one was lost, and the run trained on to its end)."""
    scheduled = []

    class Timer:
        def __init__(self, delay, function, args):
            scheduled.append((delay, function, args))

        def start(self):
            pass

    monkeypatch.setattr(vqvae_face_main.threading, "Timer", Timer)

    def __del__():
        return sys._getframe()

    vqvae_face_main._stop(sent, __del__())
    assert scheduled == [(vqvae_face_main.RESIGNAL_SECONDS, os.kill, (os.getpid(), sent))]
    with pytest.raises(raised):
        vqvae_face_main._stop(sent, sys._getframe())


def limit_file_size(size):
    """For a child process: files may not grow past `size` bytes; a write beyond it fails with EFBIG
    (SIGXFSZ ignored), as a write to a full disk fails, part-way through the file."""

    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return apply


def test_a_write_that_fails_part_way_leaves_no_partial_file_and_the_run_resumes(tmp_path):
    """A real program whose files may not grow past 40 kB: the first file larger than that (the model)
    fails in the middle of being written. One line, exit 2, no partial file, every earlier file whole;
    the same command without the limit then trains the run."""
    tree = write_lfw_tree(tmp_path / "data", people=PEOPLE[:5], per_person=2)
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "vqvae_face_main.py"), "--out", str(out), "--data", str(tree)]
    command += ["--run", "vqvae"] + [item for s in FAST + ["epochs=1"] for item in ("--set", s)]
    limited = subprocess.run(command, capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size(40_000))
    assert limited.returncode == 2, limited.stderr[-2000:]
    last = limited.stderr.strip().splitlines()[-1]
    assert re.search(r"ERROR cannot write \S+\.keras: File too large\. Files written before it are intact", last), last
    assert "Traceback" not in limited.stderr
    assert_whole(out)
    assert (out / "checkpoints" / "vqvae" / "split.json").is_file() and not list(out.rglob("*.keras"))
    assert main(out, tree, "--set", "epochs=1") == 0  # the same command, in this process
    assert json.loads((out / "checkpoints" / "vqvae" / "state.json").read_text())["epochs_done"] == 1
