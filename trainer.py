"""Build, train and resume one run: model construction, callbacks, fit, checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import inspect
import json
import logging
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

import face_data
import visualize
from atomic_files import move_aside, write_json_atomically
from errors import CheckpointError, ConfigError, LockError, WorkerLost
from training_callbacks import (
    CommitmentAnnealing,
    DeadCodeRevival,
    HistoryLog,
    LearningRateDecay,
    LossDiverged,
    ReconstructionSnapshots,
    ThroughputMeter,
    TrainingCheckpoint,
    TrainingClock,
    read_training_state,
)
from vqvae_class_keras import VAE, VQVAE, ReconstructionModel
from vqvae_config import ExperimentConfig, RunConfig, save_resolved_config

log = logging.getLogger("vqvae_faces.train")

# Constructor arguments of a saved model that may differ from the current settings when it is
# resumed or evaluated: the quantizer's training policy and the seed of its random draws. Every
# other argument is architecture or training objective and must match (see `check_compatible`).
RESUMABLE_MODEL_ARGUMENTS = frozenset({"commitment_cost", "decay", "epsilon", "codebook_init", "seed"})
MODEL_CLASSES = {"vqvae": VQVAE, "vae": VAE}
DATA_KEYS = ("image_size", "crop_border", "source_size")
SNAPSHOT_FACES = 8


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


def read_state(paths: RunPaths) -> Optional[dict]:
    """`state.json`, or None when it is missing or unreadable (a corrupt one is moved aside with a warning)."""
    if not paths.state.is_file():
        return None
    try:
        state = json.loads(paths.state.read_text(encoding="utf-8"))
        if isinstance(state, dict) and isinstance(state.get("epochs_done"), int):
            return state
        problem = "not a training state"
    except (ValueError, UnicodeDecodeError) as error:
        problem = str(error)
    kept = move_aside(paths.state)
    log.warning("%s is corrupt (%s); moved it to %s", paths.state, problem, kept.name)
    return None


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


def enable_determinism() -> None:
    """Deterministic TensorFlow ops (reproducible runs and exact resume; slower, and some GPU ops refuse)."""
    tf.config.experimental.enable_op_determinism()


def choose_precision(setting: str) -> str:
    """Resolve "auto": mixed_float16 on a GPU, float32 on CPUs (see bench/RESULTS.md)."""
    if setting != "auto":
        return setting
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"


def choose_strategy(setting: str, collective_timeout_seconds: Optional[float] = None) -> tf.distribute.Strategy:
    """The tf.distribute strategy for `distribution`.

    "auto": MultiWorkerMirroredStrategy when TF_CONFIG names several workers,
    MirroredStrategy when more than one GPU is visible, else the default
    (single-device) strategy. "mirrored" uses every GPU, or every logical CPU
    device when there is no GPU. Across workers, a collective operation that
    waits longer than `collective_timeout_seconds` (a worker died or hangs)
    raises `tf.errors.DeadlineExceededError` instead of blocking forever.
    """
    if setting == "auto":
        cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
        if len(cluster.get("worker", [])) + len(cluster.get("chief", [])) > 1:
            setting = "multi_worker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            setting = "mirrored"
        else:
            setting = "none"
    if setting == "multi_worker":
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout_seconds)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    elif setting == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        strategy = tf.distribute.MirroredStrategy(devices=[d.name for d in devices])
    else:
        strategy = tf.distribute.get_strategy()
    log.info(
        "distribution: %s (%s) with %d replica(s)", setting, type(strategy).__name__, strategy.num_replicas_in_sync
    )
    return strategy


# What a collective operation raises when a worker died (its heartbeats stopped) or did not answer in time.
WORKER_LOST_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError)


def lost_worker_message(error_text: str, tf_config: str) -> str:
    """One line naming the workers a failed collective operation waited for.

    TensorFlow names tasks as `/job:worker/replica:0/task:N`; each other worker
    named in `error_text` is looked up in TF_CONFIG's cluster. When none is
    named, every other worker is listed as a suspect.
    """
    config = json.loads(tf_config)
    cluster, task = config.get("cluster", {}), config.get("task", {})
    me = (task.get("type"), task.get("index"))
    named = {(job, int(index)) for job, index in re.findall(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", error_text)}
    others = [(job, i) for job, hosts in cluster.items() for i in range(len(hosts)) if (job, i) != me]
    lost = [key for key in others if key in named] or others
    described = ", ".join(f"{job} {index} ({cluster[job][index]})" for job, index in lost)
    return (
        f"multi-worker training stopped: {described} did not answer (it died, hangs, or took longer than "
        "collective_timeout_seconds); the last completed epoch is kept. Restart every worker with the same "
        "command to resume."
    )


def is_chief() -> bool:
    """True unless TF_CONFIG makes this process a non-chief worker (see `vqvae_face_main.train_as_worker`)."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task", {})
    if not task:
        return True
    has_chief = "chief" in config.get("cluster", {})
    return task.get("type") == "chief" or (not has_chief and task.get("type") == "worker" and task.get("index") == 0)


def model_arguments(run: RunConfig, channels: int, data_variance: Optional[float], seed: int) -> dict:
    """The constructor arguments of the model class `MODEL_CLASSES[run.model]` for the run's settings.

    The one place that maps settings to a model: a new model setting is a constructor
    argument plus its entry here (and its `RunConfig` field).
    """
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
    run: RunConfig, channels: int, data_variance: Optional[float], seed: int, learning_rate: Optional[float] = None
) -> keras.Model:
    """A fresh, compiled model for `run` (the dtype policy and strategy scope must already be set)."""
    model = MODEL_CLASSES[run.model](**model_arguments(run, channels, data_variance, seed))
    optimizer = keras.optimizers.Adam(learning_rate or run.learning_rate, global_clipnorm=run.gradient_clipnorm)
    model.compile(optimizer=optimizer, jit_compile=run.jit_compile)
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

    Arguments in `RESUMABLE_MODEL_ARGUMENTS` may differ; an argument the saved
    model lacks (saved before it existed) counts as the constructor's default.
    """
    model_class = MODEL_CLASSES[run.model]
    if saved["class_name"] != model_class.__name__:
        return [f"model: checkpoint {saved['class_name']!r}, config {run.model!r}"]
    defaults = {
        name: parameter.default
        for cls in (ReconstructionModel, model_class)
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    mismatches = []
    for key, wanted in model_arguments(run, channels=0, data_variance=None, seed=0).items():
        if key in RESUMABLE_MODEL_ARGUMENTS or key == "image_channels":
            continue
        found = saved["config"].get(key, defaults.get(key))
        if key == "data_variance":
            key, found, wanted = "normalize_by_variance", found is not None, run.normalize_by_variance
        if isinstance(found, tuple):
            found = list(found)
        if found != wanted:
            mismatches.append(f"{key}: checkpoint {found!r}, config {wanted!r}")
    return mismatches


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
    if mismatches:
        raise ConfigError(
            f"run {run_name!r} in {paths.checkpoints} was trained with different settings ("
            + "; ".join(mismatches)
            + "). Restore those settings, or pass --retrain to start it over."
        )


def _saved_data_settings(paths: RunPaths) -> Optional[dict]:
    """The data settings in `config.json`; None when there is none (a corrupt one is moved aside)."""
    if not paths.resolved_config.is_file():
        return None
    try:
        data = json.loads(paths.resolved_config.read_text(encoding="utf-8"))["data"]
        if isinstance(data, dict):
            return data
        problem = "no data settings"
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as error:
        problem = str(error)
    kept = move_aside(paths.resolved_config)
    log.warning(
        "%s is corrupt (%s); moved it to %s. The data settings the run was trained with cannot be checked.",
        paths.resolved_config,
        problem,
        kept.name,
    )
    return None


def policy_callbacks(model, run: RunConfig, clock: TrainingClock, learning_rate: float, seed: int) -> list:
    """The run's learning-rate schedule, and for a VQ-VAE its dead-code revival and commitment annealing."""
    callbacks = []
    if run.lr_schedule != "constant":
        callbacks.append(LearningRateDecay(learning_rate, clock, run.lr_schedule, run.lr_final_fraction))
    if isinstance(model, VQVAE) and run.revival.enabled:
        r = run.revival
        callbacks.append(
            DeadCodeRevival(
                model.quantizer, r.threshold, r.max_revivals_per_batch, r.every_n_batches, r.noise, r.source, seed
            )
        )
    if isinstance(model, VQVAE) and run.annealing.enabled:
        a = run.annealing
        callbacks.append(
            CommitmentAnnealing(model.quantizer, a.target_low, a.target_high, a.factor, a.decay, a.min_cost, a.max_cost)
        )
    return callbacks


def _callbacks(model, run: RunConfig, paths: RunPaths, train_count: int, snapshot_images, state, seed, schedule):
    """The training-policy callbacks; `schedule` holds the global batch size, base learning rate and,
    for multi-worker runs, the strategy whose workers must share one clock."""
    clock = TrainingClock(
        run.epochs,
        run.max_train_minutes,
        previous_seconds=(state or {}).get("train_seconds", 0.0),
        strategy=schedule["workers_strategy"],
    )
    callbacks = [clock] + policy_callbacks(model, run, clock, schedule["learning_rate"], seed)
    throughput = ThroughputMeter(schedule["global_batch"], train_count)
    checkpoint = TrainingCheckpoint(
        paths.checkpoints,
        clock,
        run.patience,
        run.min_epoch_to_start_saving,
        state=state,
        divergence_ratio=run.divergence_ratio,
    )
    callbacks += [
        throughput,
        ReconstructionSnapshots(
            snapshot_images,
            paths.images,
            run.snapshot_every,
            visualize.save_image_grid,
            tensorboard_dir=paths.tensorboard / "reconstructions",
        ),
        keras.callbacks.TensorBoard(str(paths.tensorboard), write_graph=False, update_freq="epoch"),
        HistoryLog(paths.history, read_history(paths.history, state["epochs_done"]) if state else None),
        checkpoint,
    ]
    return callbacks, clock, throughput, checkpoint


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


def train_run(
    config: ExperimentConfig,
    run_name: str,
    faces: face_data.FaceSet,
    out: Path,
    retrain: bool = False,
    strategy: Optional[tf.distribute.Strategy] = None,
) -> None:
    """Train `run_name` on `faces`, resuming from its latest checkpoint when there is one."""
    paths = RunPaths.for_run(out, run_name)
    strategy = strategy or tf.distribute.get_strategy()
    with exclusive_run_lock(paths.checkpoints):
        for retry in range(config.runs[run_name].divergence_retries + 1):
            try:
                _train_locked(config, run_name, faces, paths, retrain and retry == 0, strategy)
                return
            except LossDiverged as diverged:
                run = config.runs[run_name]
                if retry == run.divergence_retries:
                    raise
                lower = run.learning_rate * run.divergence_lr_factor
                log.warning(
                    "%s Retry %d of %d: resuming from it with learning_rate %g instead of %g.",
                    diverged,
                    retry + 1,
                    run.divergence_retries,
                    lower,
                    run.learning_rate,
                )
                runs = {**config.runs, run_name: dataclasses.replace(run, learning_rate=lower)}
                config = dataclasses.replace(config, runs=runs)


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


def _train_locked(config, run_name, faces, paths, retrain, strategy):
    run = config.runs[run_name]
    schedule = _schedule(run, config, strategy)
    try:
        state = starting_state(paths, retrain)
    except OnlyBestModel:
        log.warning(
            "run %s: %s has no latest.keras to resume training from; evaluating best.keras as it is. "
            "Pass --retrain to train the run from scratch (this replaces best.keras).",
            run_name,
            paths.checkpoints,
        )
        return
    if state and state.get("finished"):
        if not budget_raised(state, run):
            log.info(
                "run %s already finished (%d epochs, stopped by %s); evaluating it. Pass --retrain to train it again.",
                run_name,
                state["epochs_done"],
                state.get("stopped_by"),
            )
            return
        log.info("run %s: budget raised, continuing from epoch %d", run_name, state["epochs_done"])
    for unfinished in paths.checkpoints.glob("*.partial.*"):
        log.info("removing %s, left by a write that was interrupted", unfinished.name)
        unfinished.unlink()
    paths.images.mkdir(parents=True, exist_ok=True)

    keras.utils.set_random_seed(config.seed)
    policy = choose_precision(run.mixed_precision)
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        if state is None:
            split = face_data.split_by_person(
                faces.persons, config.data.val_fraction, config.data.test_fraction, config.seed
            )
            face_data.save_split(paths.split, faces, split)
            save_resolved_config(config, run_name, paths.resolved_config)
            train_images = faces.subset(split["train"])
            variance = float(np.var(train_images / 255.0)) if run.normalize_by_variance else None
            with strategy.scope():
                model = build_model(run, faces.channels, variance, config.seed, schedule["learning_rate"])
                model.build((None,) + faces.images.shape[1:])
            initial_epoch = 0
        else:
            split = face_data.load_split(paths.split, faces)
            train_images = faces.subset(split["train"])
            with strategy.scope():
                model = load_model(paths.latest_model)
            model.optimizer.learning_rate.assign(schedule["learning_rate"])
            # Under mixed_float16 the optimizer is a LossScaleOptimizer: clipping belongs to the Adam inside,
            # which sees the unscaled gradients.
            getattr(model.optimizer, "inner_optimizer", model.optimizer).global_clipnorm = run.gradient_clipnorm
            initial_epoch = state["epochs_done"]
            log.info("resuming run %s from epoch %d (%s)", run_name, initial_epoch, paths.latest_model)
        log.info(
            "run %s: %s, %s, %d train / %d val / %d test images (identity-disjoint), %d parameters, "
            "global batch %d (%d replica(s) x %d)",
            run_name,
            run.model,
            policy,
            len(split["train"]),
            len(split["val"]),
            len(split["test"]),
            model.count_params(),
            schedule["global_batch"],
            strategy.num_replicas_in_sync,
            run.batch_size,
        )
        _fit(model, run, paths, faces, split, train_images, state, initial_epoch, config, schedule)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def _schedule(run: RunConfig, config: ExperimentConfig, strategy: tf.distribute.Strategy) -> dict:
    """Global batch size, base learning rate, and the strategy whose workers must share one
    clock and whole batches (multi-worker runs only, else None)."""
    replicas = strategy.num_replicas_in_sync
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    return {
        "global_batch": run.batch_size * replicas,
        "learning_rate": run.learning_rate * (replicas if config.scale_learning_rate else 1),
        "workers_strategy": strategy if multi_worker else None,
    }


def _fit(model, run, paths, faces, split, train_images, state, initial_epoch, config, schedule):
    augmenter = None
    if config.data.augmentation.enabled:
        augmenter = face_data.FaceAugmenter(config.data.augmentation, config.data.image_size, faces.channels)
        augmenter = augmenter if augmenter.names else None
    whole_batches = schedule["workers_strategy"] is not None
    train_ds = face_data.make_training_dataset(
        train_images,
        schedule["global_batch"],
        config.seed,
        initial_epoch,
        run.epochs,
        augmenter,
        drop_remainder=whole_batches,
    )
    val_images = faces.subset(split["val"])
    val_ds = None
    if len(val_images) >= (schedule["global_batch"] if whole_batches else 1):
        val_ds = face_data.make_dataset(val_images, schedule["global_batch"], drop_remainder=whole_batches)
    snapshot_images = (val_images if len(val_images) else train_images)[:SNAPSHOT_FACES].astype(np.float32) / 255.0
    if augmenter is not None:
        originals = train_images[:SNAPSHOT_FACES].astype(np.float32) / 255.0
        variants = [augmenter(tf.constant(originals), tf.constant([config.seed, i])).numpy() for i in range(3)]
        visualize.save_image_grid(
            [originals] + variants,
            ["original", "augmented", "augmented", "augmented"],
            paths.images.parent / "augmentations.png",
            title="training augmentation (fresh each epoch)",
        )
    callbacks, clock, throughput, checkpoint = _callbacks(
        model, run, paths, len(train_images), snapshot_images, state, config.seed, schedule
    )
    try:
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=run.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=face_data.steps_per_epoch(len(train_images), schedule["global_batch"], whole_batches),
            callbacks=callbacks,
            shuffle=False,
            verbose=1 if sys.stdout.isatty() else 2,
        )
    except WORKER_LOST_ERRORS as error:
        if schedule["workers_strategy"] is None:
            raise
        raise WorkerLost(lost_worker_message(str(error), os.environ.get("TF_CONFIG") or "{}")) from None
    if checkpoint.divergence is not None:
        kept = f"epoch {checkpoint.epochs_done}" if checkpoint.epochs_done else "none yet: the run starts over"
        raise LossDiverged(
            f"{checkpoint.divergence} at learning_rate "
            f"{run.learning_rate:g}; training stopped and the last good checkpoint ({kept}) is kept in "
            f"{paths.checkpoints}. Rerun with a lower learning_rate (e.g. --set learning_rate="
            f"{run.learning_rate / 4:g}) to resume from it, or add --retrain to start over."
        )
    final_state = checkpoint.state(finished=True)
    final_state["train_images_per_second"] = throughput.images_per_second or (state or {}).get(
        "train_images_per_second"
    )
    final_state["stopped_by"] = (
        "time limit" if clock.time_limit_reached else "early stopping" if checkpoint.early_stopped else "epochs"
    )
    write_json_atomically(final_state, paths.state)
    log.info(
        "run finished after %d epochs (%s), %.1f min of training, best %s %.5f at epoch %s",
        checkpoint.epochs_done,
        final_state["stopped_by"],
        clock.elapsed_seconds / 60,
        checkpoint.monitor,
        checkpoint.best,
        checkpoint.best_epoch,
    )
    visualize.plot_training_curves(paths.history, paths.images / "training_curves.png")
