"""A run's folder: where its files are, the lock, the training state and history, compatibility.

Nothing here trains or evaluates; it answers what a run folder holds and whether a
checkpoint fits the current settings, and never deletes a file unless told to (`--retrain`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from vqvae_faces.atomic_files import move_aside
from vqvae_faces.callbacks import read_training_state
from vqvae_faces.config import ExperimentConfig, RunConfig
from vqvae_faces.errors import CheckpointError, ConfigError, LockError
from vqvae_faces.model_settings import model_mismatches, saved_model_config

log = logging.getLogger("vqvae_faces.run_folder")

DATA_KEYS = ("image_size", "crop_border", "source_size")


@dataclass
class RunPaths:
    """Where one run keeps its files."""

    checkpoints: Path
    images: Path

    @classmethod
    def for_run(cls, out: Path, run_name: str) -> "RunPaths":
        return cls(out / "checkpoints" / run_name, out / "images_saved" / run_name)

    @property
    def best_model(self) -> Path:
        return self.checkpoints / "best.keras"

    @property
    def latest_model(self) -> Path:
        return self.checkpoints / "latest.keras"

    @property
    def state(self) -> Path:
        return self.checkpoints / "state.json"

    @property
    def split(self) -> Path:
        return self.checkpoints / "split.json"

    @property
    def resolved_config(self) -> Path:
        return self.checkpoints / "config.json"

    @property
    def history(self) -> Path:
        return self.checkpoints / "history.csv"

    @property
    def tensorboard(self) -> Path:
        return self.checkpoints / "tensorboard"

    @property
    def data_cache(self) -> Path:
        """The cache of decoded faces and token grids shared by every run under the same --out."""
        return self.checkpoints.parent / "data_cache"

    def sibling(self, run_name: str) -> "RunPaths":
        """The folders of another run under the same --out."""
        return RunPaths(self.checkpoints.parent / run_name, self.images.parent / run_name)

    def trained_model(self) -> Optional[Path]:
        """The model file evaluation uses: best.keras, else latest.keras; None when neither exists."""
        return next((path for path in (self.best_model, self.latest_model) if path.is_file()), None)


def file_digest(path: Path) -> str:
    """SHA-256 (hex, 16 digits) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def run_lock(folder: Path, exclusive: bool):
    """Hold `folder/train.lock`: exclusively while training, shared while evaluating.

    Several evaluations may read a run at once; training (which rewrites and, with
    --retrain, deletes files) excludes every other process. A conflict is refused at
    once with a message; the lock is an OS file lock, so it disappears with its
    process, even after SIGKILL.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.lock", "a+") as handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise LockError(
                    f"cannot lock {folder / 'train.lock'}: {error.strerror or error} (file locks may not work on "
                    "this file system); use an --out folder on a local disk."
                ) from None
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            busy = "training or evaluating it" if exclusive else f"training it (pid {owner})"
            raise LockError(
                f"cannot {'train' if exclusive else 'evaluate'} run folder {folder}: another process is {busy}; "
                "wait for it to finish or use another --out folder."
            ) from None
        if exclusive:
            handle.truncate(0)
            handle.write(str(os.getpid()))
            handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def exclusive_run_lock(folder: Path):
    """`run_lock(folder, exclusive=True)`: the lock a trainer holds."""
    return run_lock(folder, exclusive=True)


def _read_record(path: Path, extract, consequence: str = ""):
    """`extract(parsed JSON of path)`, or None when the file is missing or unreadable.

    `extract` returns the value, or raises `KeyError`/`TypeError`/`ValueError` when the
    JSON is not the expected record; such a file is moved aside with a warning (plus
    `consequence`), so it is kept for the user and out of the program's way.
    """
    if not path.is_file():
        return None
    try:
        return extract(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as error:
        kept = move_aside(path)
        log.warning("%s is corrupt (%s); moved it to %s.%s", path, error, kept.name, consequence)
        return None


def _training_state(record):
    if not isinstance(record, dict) or not isinstance(record.get("epochs_done"), int):
        raise ValueError("not a training state")
    return record


def read_state(paths: RunPaths) -> Optional[dict]:
    """`state.json`, or None when it is missing or unreadable (a corrupt one is moved aside with a warning)."""
    return _read_record(paths.state, _training_state)


def resumable_state(paths: RunPaths) -> Optional[dict]:
    """The state a rerun continues from, or None when there is no `latest.keras` to continue.

    Normally `state.json`. A process killed between writing `latest.keras` and
    `state.json` leaves `state.json` one epoch behind, and a corrupt `state.json`
    says nothing; the counters saved inside `latest.keras` belong to its weights,
    so they win. A corrupt `latest.keras` is a `CheckpointError`.
    """
    if not paths.latest_model.is_file():
        return None
    try:
        embedded = read_training_state(paths.latest_model)
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as error:
        raise CheckpointError(
            f"{paths.latest_model} is corrupt ({error}), so the run cannot resume from it. Restore the file, "
            "evaluate best.keras with --eval, or pass --retrain to train the run from scratch."
        ) from None
    state = read_state(paths)
    if embedded is not None and (state is None or state.get("epochs_done") != embedded["epochs_done"]):
        log.info("state.json does not match latest.keras (missing, corrupt or one write behind); using latest.keras")
        return embedded
    if state is None:
        raise CheckpointError(
            f"{paths.state} is missing or corrupt and {paths.latest_model} carries no counters of its own: "
            "pass --retrain to train the run from scratch."
        )
    return state


def read_history(path: Path, epochs_done: int) -> Optional[pd.DataFrame]:
    """The rows of `history.csv` for the epochs before the checkpoint, so a resumed run repeats none.

    An unreadable file is moved aside with a warning and the history starts over.
    """
    if not path.is_file() or not path.stat().st_size:
        return None
    try:
        history = pd.read_csv(path)
        epochs = pd.to_numeric(history["epoch"], errors="raise")
    except (ValueError, KeyError, UnicodeDecodeError, pd.errors.ParserError) as error:
        kept = move_aside(path)
        log.warning("%s is unreadable (%s); moved it to %s and starting a new history", path, error, kept.name)
        return None
    return history[epochs < epochs_done]


def check_compatible(paths: RunPaths, config: ExperimentConfig, run_name: str) -> None:
    """Refuse to resume or evaluate a checkpoint built with another architecture, training objective or data shape.

    The model settings are compared with the constructor arguments stored inside
    the run's `.keras` files, the data settings with `config.json`. A corrupt
    `config.json` is moved aside with a warning (the models still carry their own
    settings).
    """
    mismatches = []
    for model_file in (paths.latest_model, paths.best_model):
        saved = saved_model_config(model_file) if model_file.is_file() else None
        if saved is not None:
            mismatches = model_mismatches(saved, config.runs[run_name])
            break
    saved_data = _saved_data_settings(paths)
    if saved_data is not None:
        current = dataclasses.asdict(config.data)
        mismatches += [
            f"data.{key}: checkpoint {saved_data.get(key)!r}, config {current[key]!r}"
            for key in DATA_KEYS
            if key in saved_data and saved_data[key] != current[key]
        ]
    run = config.runs[run_name]
    vqvae_model = paths.sibling(run.tokens_from).trained_model() if run.model == "prior" else None
    recorded = _read_record(paths.resolved_config, _tokens_checkpoint) if vqvae_model else None
    if recorded and file_digest(vqvae_model) != recorded:
        raise ConfigError(
            f"run {run_name!r} in {paths.checkpoints} learned the tokens of another model of run {run.tokens_from!r} "
            f"(digest {recorded}; {vqvae_model} is now {file_digest(vqvae_model)}): its tokens changed, so pass "
            "--retrain to train the prior again."
        )
    if mismatches:
        raise ConfigError(
            f"run {run_name!r} in {paths.checkpoints} was trained with different settings ("
            + "; ".join(mismatches)
            + "). Restore those settings, or pass --retrain to start it over."
        )


def _tokens_checkpoint(record):
    if not isinstance(record, dict):
        raise TypeError("not a run's settings")
    return record.get("tokens_checkpoint")


def _data_settings(record):
    if not isinstance(record["data"], dict):
        raise TypeError("no data settings")
    return record["data"]


def _saved_data_settings(paths: RunPaths) -> Optional[dict]:
    """The data settings in `config.json`; None when there is none (a corrupt one is moved aside)."""
    consequence = " The data settings the run was trained with cannot be checked."
    return _read_record(paths.resolved_config, _data_settings, consequence)


def recorded_data_path(out: Path, run_names: list[str]) -> Optional[str]:
    """The `data.path` the first of `run_names` trained under `out` was trained on (its config.json), or None."""
    for run_name in run_names:
        saved = _saved_data_settings(RunPaths.for_run(out, run_name))
        if saved is not None:
            return saved.get("path")
    return None


def budget_raised(state: dict, run: RunConfig) -> bool:
    """Whether a finished run may continue: it ran out of epochs or time and the config now allows more.

    A run stopped by early stopping stays finished.
    """
    more_epochs = state["epochs_done"] < run.epochs
    if state.get("stopped_by") == "epochs":
        return more_epochs
    if state.get("stopped_by") == "time limit":
        more_time = run.max_train_minutes is None or state["train_seconds"] < 60.0 * run.max_train_minutes
        return more_epochs and more_time
    return False


class OnlyBestModel(Exception):
    """The run folder holds `best.keras` but no `latest.keras`: evaluate it, do not train."""


def clear_run_folder(paths: RunPaths) -> None:
    """--retrain: delete the run's checkpoints (everything but the lock file)."""
    for stale in paths.checkpoints.iterdir():
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.name != "train.lock":
            stale.unlink()


def starting_state(paths: RunPaths, retrain: bool) -> Optional[dict]:
    """The state training continues from: None for a fresh start. Never deletes a file without `retrain`.

    Raises `OnlyBestModel` when there is a `best.keras` but nothing to resume
    from, and `CheckpointError` naming the files when a folder holds trained
    epochs but no model (an unclear state: only the user can decide).
    """
    if retrain:
        clear_run_folder(paths)
        return None
    state = resumable_state(paths)
    if state is not None:
        return state
    if paths.best_model.is_file():
        raise OnlyBestModel()
    previous = read_state(paths)
    if previous is not None and previous.get("epochs_done"):
        found = sorted(p.name for p in paths.checkpoints.iterdir() if p.name != "train.lock")
        raise CheckpointError(
            f"run folder {paths.checkpoints} records {previous['epochs_done']} trained epochs but holds no "
            f"model to continue from (found: {', '.join(found)}). Restore latest.keras or best.keras, or pass "
            "--retrain to train the run from scratch (this deletes those files)."
        )
    return None
