"""Train one run: device and precision, the callbacks, the fit, divergence retries, multi-worker.

The run folder's files (state, locks, compatibility) are `run_folder`'s; the mapping
from settings to a model is `model_settings`'; this module orchestrates them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from vqvae_class_keras import VQVAE
from vqvae_faces import pipeline, visualize
from vqvae_faces.atomic_files import write_json_atomically
from vqvae_faces.callbacks import (
    CommitmentAnnealing,
    DeadCodeRevival,
    HistoryLog,
    LearningRateDecay,
    LossDiverged,
    ReconstructionSnapshots,
    SampleSnapshots,
    TensorBoardLog,
    ThroughputMeter,
    TrainingCheckpoint,
    TrainingClock,
)
from vqvae_faces.compiled import compiled
from vqvae_faces.config import ExperimentConfig, RunConfig, save_resolved_config
from vqvae_faces.errors import WorkerLost
from vqvae_faces.lfw_files import FaceSet, load_split, save_split, split_by_person
from vqvae_faces.model_settings import apply_training_policy, build_model, load_model
from vqvae_faces.prior_data import PriorSource, load_prior_source
from vqvae_faces.run_folder import (
    OnlyBestModel,
    RunPaths,
    budget_raised,
    exclusive_run_lock,
    read_history,
    starting_state,
)

log = logging.getLogger("vqvae_faces.train")

SNAPSHOT_FACES = 8


def enable_determinism() -> None:
    """Deterministic TensorFlow ops (reproducible runs and exact resume; slower, and some GPU ops refuse)."""
    tf.config.experimental.enable_op_determinism()


def choose_precision(setting: str) -> str:
    """Resolve "auto": mixed_float16 on a GPU, float32 on CPUs (see bench/RESULTS.md)."""
    if setting != "auto":
        return setting
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"


def tf_config() -> dict:
    """The TF_CONFIG environment variable, parsed ({} when it is not set)."""
    return json.loads(os.environ.get("TF_CONFIG") or "{}")


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
        cluster = tf_config().get("cluster", {})
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


def lost_worker_message(error_text: str, config: dict) -> str:
    """One line naming the workers a failed collective operation waited for.

    TensorFlow names tasks as `/job:worker/replica:0/task:N`; each other worker
    named in `error_text` is looked up in the cluster of `config` (TF_CONFIG).
    When none is named, every other worker is listed as a suspect.
    """
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
    """True unless TF_CONFIG makes this process a non-chief worker (see `train_as_worker`)."""
    config = tf_config()
    task = config.get("task", {})
    if not task:
        return True
    has_chief = "chief" in config.get("cluster", {})
    return task.get("type") == "chief" or (not has_chief and task.get("type") == "worker" and task.get("index") == 0)


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
    if isinstance(model, VQVAE) and run.annealing.enabled and run.rate_lambda > 0:
        log.info("annealing off: with rate_lambda=%g the rate term decides how evenly codes are used", run.rate_lambda)
    elif isinstance(model, VQVAE) and run.annealing.enabled:
        a = run.annealing
        callbacks.append(
            CommitmentAnnealing(model.quantizer, a.target_low, a.target_high, a.factor, a.decay, a.min_cost, a.max_cost)
        )
    return callbacks


@dataclass(frozen=True)
class Schedule:
    """How one run is spread over the replicas.

    global_batch: `batch_size` x replicas; learning_rate: the base rate (scaled by the
    replicas when `scale_learning_rate`); workers_strategy: the strategy whose workers
    must share one clock (multi-worker runs only, else None); whole_batches: drop a last
    partial batch, as with several replicas, whose all-reduces need the same batch shape on each.
    """

    global_batch: int
    learning_rate: float
    workers_strategy: Optional[tf.distribute.Strategy]
    whole_batches: bool

    @classmethod
    def for_run(cls, run: RunConfig, config: ExperimentConfig, strategy: tf.distribute.Strategy) -> "Schedule":
        replicas = strategy.num_replicas_in_sync
        multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        return cls(
            global_batch=run.batch_size * replicas,
            learning_rate=run.learning_rate * (replicas if config.scale_learning_rate else 1),
            workers_strategy=strategy if multi_worker else None,
            whole_batches=replicas > 1,
        )


@dataclass(frozen=True)
class FitJob:
    """Everything one call of `model.fit` works from: the settings, the run folder, the faces and
    their split, the state it resumes from (None for a fresh start) and the schedule; for a
    prior, the VQ-VAE and token grids it learns from."""

    config: ExperimentConfig
    run: RunConfig
    paths: RunPaths
    faces: FaceSet
    split: dict
    state: Optional[dict]
    schedule: Schedule
    prior: Optional[PriorSource] = None

    @property
    def initial_epoch(self) -> int:
        return self.state["epochs_done"] if self.state else 0

    @property
    def train_images(self) -> np.ndarray:
        return self.faces.subset(self.split["train"])

    @property
    def train_grids(self) -> np.ndarray:
        """A prior's training grids: the training faces' tokens, then those of the mirrored faces."""
        tokens = self.prior.tokens
        parts = ["train", "train_flipped"] if self.run.flipped_faces else ["train"]
        return np.concatenate([tokens[part] for part in parts])


def _callbacks(model, job: FitJob, snapshots: keras.callbacks.Callback, train_count: int):
    """The training-policy callbacks, and the clock, throughput meter and checkpoint among them."""
    run, paths, state = job.run, job.paths, job.state
    clock = TrainingClock(
        run.epochs,
        run.max_train_minutes,
        previous_seconds=(state or {}).get("train_seconds", 0.0),
        strategy=job.schedule.workers_strategy,
    )
    callbacks = [clock] + policy_callbacks(model, run, clock, job.schedule.learning_rate, job.config.seed)
    throughput = ThroughputMeter(job.schedule.global_batch, train_count)
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
        snapshots,
        TensorBoardLog(str(paths.tensorboard), write_graph=False, update_freq="epoch"),
        HistoryLog(paths.history, read_history(paths.history, state["epochs_done"]) if state else None),
        checkpoint,
    ]
    return callbacks, clock, throughput, checkpoint


@contextlib.contextmanager
def worker_scratch(training: bool):
    """A scratch folder for a non-chief worker's runs, removed at the end; None when not `training`
    or on the chief (or a single process)."""
    if not training or is_chief():
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="vqvae-worker-") as scratch:
        yield Path(scratch)


def train_as_worker(
    config: ExperimentConfig, run_name: str, faces: FaceSet, out: Path, scratch: Path, retrain: bool, strategy
) -> None:
    """A non-chief worker trains in lockstep with the chief but writes into `scratch` (`worker_scratch`).

    It starts from a copy of the chief's checkpoints in `out` (so both resume from the same
    epoch); a prior's VQ-VAE comes from `scratch` when this worker trained it there earlier
    in the same command, with the chief's weights. Only the chief keeps checkpoints.
    """
    copied = [run_name] if not retrain else []
    if config.runs[run_name].model == "prior":  # the worker tokenizes with the chief's VQ-VAE
        copied.append(config.runs[run_name].tokens_from)
    for name in copied:
        chief_folder, target = RunPaths.for_run(out, name).checkpoints, RunPaths.for_run(scratch, name).checkpoints
        if chief_folder.is_dir() and not target.is_dir():
            shutil.copytree(chief_folder, target, ignore=shutil.ignore_patterns("train.lock", "tensorboard"))
    train_run(config, run_name, faces, scratch, retrain=retrain, strategy=strategy)


def train_run(
    config: ExperimentConfig,
    run_name: str,
    faces: FaceSet,
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


def _train_locked(config, run_name, faces, paths, retrain, strategy):
    run = config.runs[run_name]
    schedule = Schedule.for_run(run, config, strategy)
    to_train, state = _state_to_continue(run_name, run, paths, retrain)
    if not to_train:
        return
    for unfinished in paths.checkpoints.glob("*.partial.*"):
        log.info("removing %s, left by a write that was interrupted", unfinished.name)
        unfinished.unlink()
    paths.images.mkdir(parents=True, exist_ok=True)

    prior = load_prior_source(config, run_name, faces, paths) if run.model == "prior" else None
    keras.utils.set_random_seed(config.seed)
    policy = choose_precision(run.mixed_precision)
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        model, split = _model_and_split(config, run_name, faces, paths, state, prior, schedule, strategy)
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
            schedule.global_batch,
            strategy.num_replicas_in_sync,
            run.batch_size,
        )
        _fit(model, FitJob(config, run, paths, faces, split, state, schedule, prior))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def _state_to_continue(run_name: str, run: RunConfig, paths: RunPaths, retrain: bool) -> tuple[bool, Optional[dict]]:
    """Whether the run trains (not when it finished within its budget, or only its best.keras is left),
    and the saved state it resumes from (None: it starts afresh)."""
    try:
        state = starting_state(paths, retrain)
    except OnlyBestModel:
        log.warning(
            "run %s: %s has no latest.keras to resume training from; evaluating best.keras as it is. "
            "Pass --retrain to train the run from scratch (this replaces best.keras).",
            run_name,
            paths.checkpoints,
        )
        return False, None
    if state and state.get("finished"):
        if not budget_raised(state, run):
            log.info(
                "run %s already finished (%d epochs, stopped by %s); evaluating it. Pass --retrain to train it again.",
                run_name,
                state["epochs_done"],
                state.get("stopped_by"),
            )
            return False, state
        log.info("run %s: budget raised, continuing from epoch %d", run_name, state["epochs_done"])
    return True, state


def _model_and_split(config, run_name, faces, paths, state, prior, schedule, strategy):
    """The model to train and the split it trains on: built afresh (a new split saved, or for a prior
    its VQ-VAE's) when there is no `state`, else resumed from latest.keras with the saved split."""
    run = config.runs[run_name]
    if state is None and prior is not None:
        split = prior.split  # the VQ-VAE's: the prior is tested on the faces the VQ-VAE never saw
        save_split(paths.split, faces, split)
        save_resolved_config(config, run_name, paths.resolved_config, tokens_checkpoint=prior.digest)
        alphabet = config.token_alphabet(run_name)
        with strategy.scope():
            model = build_model(run, 0, None, config.seed, schedule.learning_rate, tokens=alphabet)
            model(np.zeros((1, *alphabet[1]), np.int32))
    elif state is None:
        split = split_by_person(faces.persons, config.data.val_fraction, config.data.test_fraction, config.seed)
        save_split(paths.split, faces, split)
        save_resolved_config(config, run_name, paths.resolved_config)
        train_images = faces.subset(split["train"])
        variance = float(np.var(train_images / 255.0)) if run.normalize_by_variance else None
        with strategy.scope():
            model = build_model(run, faces.channels, variance, config.seed, schedule.learning_rate)
            model.build((None,) + faces.images.shape[1:])
    else:
        split = load_split(paths.split, faces)
        with strategy.scope():
            model = load_model(paths.latest_model)
        apply_training_policy(model, run, schedule.learning_rate)
        log.info("resuming run %s from epoch %d (%s)", run_name, state["epochs_done"], paths.latest_model)
    if not model.optimizer.built:
        # Eagerly: built inside the first traced train step, the slots cost about a second of tracing.
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)
    return model, split


def weights_digest(model: keras.Model) -> str:
    """SHA-256 (12 hex digits) of every model weight, trainable or not (the codebook and its EMA
    statistics included), in this process: the workers of one run log the same digest."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight.value)).tobytes())
    return digest.hexdigest()[:12]


def _image_inputs(job: FitJob):
    """An autoencoder's training and validation datasets, training-set size and snapshot callback."""
    config, run, paths, schedule = job.config, job.run, job.paths, job.schedule
    faces, train_images = job.faces, job.train_images
    augmenter = None
    if config.data.augmentation.enabled:
        augmenter = pipeline.FaceAugmenter(config.data.augmentation, config.data.image_size, faces.channels)
        augmenter = augmenter if augmenter.names else None
    whole_batches = schedule.whole_batches
    train_ds = pipeline.make_training_dataset(
        train_images,
        schedule.global_batch,
        config.seed,
        job.initial_epoch,
        run.epochs,
        augmenter,
        drop_remainder=whole_batches,
    )
    val_images = faces.subset(job.split["val"])
    val_ds = None
    if len(val_images) >= (schedule.global_batch if whole_batches else 1):
        val_ds = pipeline.make_dataset(val_images, schedule.global_batch, drop_remainder=whole_batches)
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
    snapshots = ReconstructionSnapshots(
        snapshot_images,
        paths.images,
        run.snapshot_every,
        visualize.save_image_grid,
        tensorboard_dir=paths.tensorboard / "reconstructions",
    )
    return train_ds, val_ds, len(train_images), snapshots


def _token_inputs(job: FitJob):
    """A prior's training and validation datasets of token grids, training-set size and snapshot callback."""
    config, run, schedule = job.config, job.run, job.schedule
    whole_batches = schedule.whole_batches
    val_grids = job.prior.tokens["val"]
    if run.augmentation.enabled:
        faces = job.train_images
        faces = np.concatenate([faces, faces[:, :, ::-1]]) if run.flipped_faces else faces
        augmenter = pipeline.FaceAugmenter(run.augmentation, faces.shape[1], faces.shape[-1])
        tokenize = compiled(job.prior.vqvae, VQVAE.encode_to_tokens)
        train_count = len(faces)
        log.info(
            "the prior learns the tokens of fresh variants of %d faces every epoch (%s)",
            train_count,
            augmenter.names,
        )
        train_ds = pipeline.make_training_dataset(
            faces, schedule.global_batch, config.seed, job.initial_epoch, run.epochs, augmenter, whole_batches, tokenize
        )
    else:
        train_grids = job.train_grids
        train_count = len(train_grids)
        train_ds = pipeline.make_token_training_dataset(
            train_grids, schedule.global_batch, config.seed, job.initial_epoch, run.epochs, drop_remainder=whole_batches
        )
    val_ds = None
    if len(val_grids) >= (schedule.global_batch if whole_batches else 1):
        val_ds = pipeline.make_token_dataset(val_grids, schedule.global_batch, drop_remainder=whole_batches)
    snapshots = SampleSnapshots(
        job.prior.vqvae.decode_tokens,
        SNAPSHOT_FACES,
        job.paths.images,
        run.snapshot_every,
        visualize.save_image_grid,
        config.seed,
        tensorboard_dir=job.paths.tensorboard / "samples",
    )
    return train_ds, val_ds, train_count, snapshots


def _fit(model, job: FitJob) -> None:
    """Train `model` as `job` says, then write the final state and the training curves."""
    run, paths, state, schedule = job.run, job.paths, job.state, job.schedule
    whole_batches = schedule.whole_batches
    train_ds, val_ds, train_count, snapshots = (_token_inputs if job.prior else _image_inputs)(job)
    callbacks, clock, throughput, checkpoint = _callbacks(model, job, snapshots, train_count)
    try:
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=run.epochs,
            initial_epoch=job.initial_epoch,
            steps_per_epoch=pipeline.steps_per_epoch(train_count, schedule.global_batch, whole_batches),
            callbacks=callbacks,
            shuffle=False,
            verbose=1 if sys.stdout.isatty() else 2,
        )
    except WORKER_LOST_ERRORS as error:
        if schedule.workers_strategy is None:
            raise
        raise WorkerLost(lost_worker_message(str(error), tf_config())) from None
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
        "run finished after %d epochs (%s), %.1f min of training, best %s %.5f at epoch %s; weights digest %s",
        checkpoint.epochs_done,
        final_state["stopped_by"],
        clock.elapsed_seconds / 60,
        checkpoint.monitor,
        checkpoint.best,
        checkpoint.best_epoch,
        weights_digest(model),
    )
    visualize.plot_training_curves(paths.history, paths.images / "training_curves.png")
