"""Training policy as Keras callbacks: annealing, revival, time budget, LR schedule,
snapshots, throughput and crash-safe checkpoints.

The model owns the math (see `VectorQuantizerEMA.revive_dead_codes`); these classes
decide when and how much. Per-step hooks only count batches, read the clock or
launch a compiled graph (revival); statistics are read from layer weights or
the epoch logs. The one exception is a multi-worker run with a time budget,
where `TrainingClock` all-reduces the clock after every batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
import zipfile
from pathlib import Path
from typing import Callable, Optional

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from vqvae_faces.atomic_files import (
    cannot_write_message,
    write_atomically,
    write_json_atomically,
    write_text_atomically,
)
from vqvae_faces.errors import StorageError, TrainingError


class CommitmentAnnealing(keras.callbacks.Callback):
    """Steer the quantizer's `commitment_cost` by how evenly the codebook is used, once per epoch.

    The statistic is `quantizer.codebook_evenness()`: the perplexity of the EMA
    code counts over K (1 = every code equally used). It does not depend on the
    batch size, unlike the fraction of codes hit in one batch (at batch 8 a
    batch has 2,048 tokens for 512 codes, so that fraction stays near 0.86 even
    when every code is in use). Below `[target_low, target_high]` the cost is
    divided by `factor` (weaker commitment lets encoder outputs move and reach
    rarely used codes); above it the cost is multiplied by `factor`; inside it
    the cost decays by `decay`. The result is clamped to `[min_cost, max_cost]`.
    The cost lives in a layer weight, so checkpoints keep the annealed value.
    Logs `codebook_evenness` and `commitment_cost`.
    """

    def __init__(self, quantizer, target_low, target_high, factor, decay, min_cost, max_cost):
        super().__init__()
        if not 0.0 <= target_low <= target_high <= 1.0:
            raise ValueError(f"need 0 <= target_low <= target_high <= 1, received {target_low}, {target_high}")
        if not 0.0 <= min_cost <= max_cost:
            raise ValueError(f"need 0 <= min_cost <= max_cost, received {min_cost}, {max_cost}")
        self.quantizer = quantizer
        self.target_low, self.target_high = target_low, target_high
        self.factor, self.decay = factor, decay
        self.min_cost, self.max_cost = min_cost, max_cost

    def next_cost(self, cost: float, evenness: float) -> float:
        """The annealing rule: the new commitment cost for this epoch's codebook evenness."""
        if evenness < self.target_low:
            cost = cost / self.factor
        elif evenness > self.target_high:
            cost = cost * self.factor
        else:
            cost = cost * self.decay
        return float(min(max(cost, self.min_cost), self.max_cost))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        evenness = float(self.quantizer.codebook_evenness())
        cost = self.next_cost(float(self.quantizer.commitment_cost.numpy()), evenness)
        self.quantizer.commitment_cost.assign(cost)
        logs["codebook_evenness"] = evenness
        logs["commitment_cost"] = cost


class DeadCodeRevival(keras.callbacks.Callback):
    """Every `every_n_batches` training batches, revive up to `max_revivals_per_batch` dead codes.

    See `VectorQuantizerEMA.revive_dead_codes` for the rule. Batches are counted by the optimizer's
    step counter, and each revival's random draws are seeded by (`seed`, step),
    so a resumed run revives exactly as an uninterrupted one. The revival runs
    as one compiled graph on the quantizer's weights; the number revived is
    summed in a variable and reported once per epoch as `revived_codes`.
    """

    def __init__(
        self,
        quantizer,
        threshold=0.1,
        max_revivals_per_batch=5,
        every_n_batches=1,
        noise=0.01,
        source="encoder",
        seed=0,
    ):
        super().__init__()
        self.quantizer = quantizer
        self.every_n_batches = every_n_batches
        self.seed = tf.constant([seed, 1], tf.int64)
        self.revived = tf.Variable(0, dtype=tf.int32, trainable=False)
        self.steps_done = 0
        self._revive = tf.function(
            lambda: self.revived.assign_add(
                quantizer.revive_dead_codes(
                    threshold,
                    max_revivals_per_batch,
                    noise,
                    source,
                    tf.random.experimental.stateless_fold_in(self.seed, self.model.optimizer.iterations),
                )
            )
        )

    def on_train_begin(self, logs=None):
        # Read the step counter once; per batch it is only counted in Python and read inside the graph.
        self.steps_done = int(self.model.optimizer.iterations.numpy())

    def on_epoch_begin(self, epoch, logs=None):
        self.revived.assign(0)

    def on_train_batch_end(self, batch, logs=None):
        self.steps_done += 1
        if self.steps_done % self.every_n_batches == 0:
            self._revive()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["revived_codes"] = int(self.revived.numpy())


class TrainingClock(keras.callbacks.Callback):
    """Wall-clock training time across resumes; stops training after `max_minutes`.

    `elapsed_seconds` counts this run's time plus `previous_seconds` from
    earlier sessions of the same run. `progress(epoch)` is the fraction of the
    training budget used: the larger of the epoch fraction and the time fraction.

    With several workers (`strategy` given), every worker must stop at the same
    step and use the same learning rate, so after each batch the workers'
    clocks are averaged with one all-reduce and decisions use that shared time.
    `clock` returns seconds (`time.monotonic`; a test passes its own).
    """

    def __init__(
        self,
        total_epochs: int,
        max_minutes: Optional[float] = None,
        previous_seconds: float = 0.0,
        strategy: Optional[tf.distribute.Strategy] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        self.clock = clock
        self.total_epochs = total_epochs
        self.max_seconds = None if max_minutes is None else 60.0 * max_minutes
        self.previous_seconds = previous_seconds
        self.strategy = strategy
        self.started = None
        self.shared_seconds = previous_seconds
        self.time_limit_reached = False

    @property
    def elapsed_seconds(self) -> float:
        running = 0.0 if self.started is None else self.clock() - self.started
        return self.previous_seconds + running

    def _budget_seconds(self) -> float:
        return self.elapsed_seconds if self.strategy is None else self.shared_seconds

    def progress(self, epoch: float) -> float:
        fraction = epoch / self.total_epochs
        if self.max_seconds:
            fraction = max(fraction, self._budget_seconds() / self.max_seconds)
        return min(fraction, 1.0)

    def _average_over_workers(self, seconds: float) -> float:
        value = tf.constant(seconds, tf.float32)
        context_mean = self.strategy.run(
            lambda: tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.MEAN, value)
        )
        return float(self.strategy.experimental_local_results(context_mean)[0])

    def on_train_begin(self, logs=None):
        self.started = self.clock()
        self.shared_seconds = self.previous_seconds

    def on_train_batch_end(self, batch, logs=None):
        if self.max_seconds is None:
            return
        if self.strategy is not None:
            self.shared_seconds = self._average_over_workers(self.elapsed_seconds)
        if self._budget_seconds() >= self.max_seconds:
            self.time_limit_reached = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["train_seconds"] = self.elapsed_seconds


class LearningRateDecay(keras.callbacks.Callback):
    """Decay from `base_rate` to `final_fraction * base_rate` over the training budget.

    `shape` is "cosine" (half a cosine period) or "linear". Progress comes from
    `TrainingClock.progress`, so a time-limited run finishes its schedule when
    its time runs out. Updated every `update_every` batches.
    """

    SHAPES = ("cosine", "linear")

    def __init__(
        self,
        base_rate: float,
        clock: TrainingClock,
        shape: str = "cosine",
        final_fraction: float = 0.02,
        update_every: int = 20,
    ):
        super().__init__()
        if shape not in self.SHAPES:
            raise ValueError(f"shape must be one of {self.SHAPES}. Received: shape={shape!r}")
        self.base_rate = base_rate
        self.clock = clock
        self.shape = shape
        self.final_fraction = final_fraction
        self.update_every = update_every
        self.epoch = 0
        self.steps_per_epoch = None

    def rate(self, progress: float) -> float:
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.shape == "cosine" else 1.0 - progress
        return self.base_rate * (self.final_fraction + (1.0 - self.final_fraction) * remaining)

    def _update(self, batch):
        fraction = batch / self.steps_per_epoch if self.steps_per_epoch else 0.0
        self.model.optimizer.learning_rate.assign(self.rate(self.clock.progress(self.epoch + fraction)))

    def on_train_begin(self, logs=None):
        self.steps_per_epoch = (self.params or {}).get("steps")

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self._update(0)

    def on_train_batch_begin(self, batch, logs=None):
        if batch and batch % self.update_every == 0:
            self._update(batch)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(self.model.optimizer.learning_rate.numpy())


class ThroughputMeter(keras.callbacks.Callback):
    """Steady-state training images/s: batches x batch size over batch time, first epoch excluded.

    `clock` returns seconds (`time.perf_counter`; a test passes its own).
    """

    def __init__(self, batch_size: int, num_images: int, clock: Callable[[], float] = time.perf_counter):
        super().__init__()
        self.clock = clock
        self.batch_size = batch_size
        self.num_images = num_images
        self.images = 0
        self.seconds = 0.0
        self.epochs_seen = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = self.clock()
        self.last_batch_end = self.epoch_start
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        self.last_batch_end = self.clock()

    def on_epoch_end(self, epoch, logs=None):
        self.epochs_seen += 1
        if self.epochs_seen > 1:
            self.images += min(self.batches * self.batch_size, self.num_images)
            self.seconds += self.last_batch_end - self.epoch_start
        if logs is not None and self.images_per_second is not None:
            logs["images_per_second"] = self.images_per_second

    @property
    def images_per_second(self) -> Optional[float]:
        return self.images / self.seconds if self.seconds > 0 else None


class HistoryLog(keras.callbacks.Callback):
    """Every epoch's logs as a row of a CSV file, the whole file rewritten atomically after each epoch.

    Unlike `keras.callbacks.CSVLogger`, which appends without fsync, an
    interrupted write (full disk, SIGKILL) never leaves a torn row. Columns:
    `epoch` (0-based, as Keras counts), then the log keys in sorted order.

    Args:
        path: the CSV file.
        previous: rows of earlier epochs (a resumed run's history up to its checkpoint), or None.
    """

    def __init__(self, path: Path, previous: Optional[pd.DataFrame] = None):
        super().__init__()
        self.path = Path(path)
        self.rows = [] if previous is None else previous.to_dict("records")

    def on_epoch_end(self, epoch, logs=None):
        values = {key: float(np.mean(keras.ops.convert_to_numpy(value))) for key, value in (logs or {}).items()}
        self.rows.append({"epoch": epoch, **dict(sorted(values.items()))})
        write_text_atomically(pd.DataFrame(self.rows).to_csv(index=False), self.path)


@contextlib.contextmanager
def _tensorboard_writes(folder: Path):
    """TensorBoard's writes into `folder`: one that fails (disk full, no permission, a file where the folder
    should be) ends the run with the one-line `StorageError` of every other write."""
    try:
        yield
    except (tf.errors.OpError, OSError) as error:
        if isinstance(error, StorageError):
            raise
        cause = str(getattr(error, "message", None) or error).splitlines()[0]
        cause = re.sub(r"\s*\[Op:.*$", "", re.sub(r"\{\{.*?\}\}\s*", "", cause))  # TensorFlow's op names
        raise StorageError(cannot_write_message(Path(folder), OSError(cause))) from None


class TensorBoardLog(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback (scalars per epoch into `log_dir`) whose failed writes end the run with one
    line, as every other write does."""

    def on_train_begin(self, logs=None):
        with _tensorboard_writes(self.log_dir):
            super().on_train_begin(logs)

    def on_epoch_end(self, epoch, logs=None):
        with _tensorboard_writes(self.log_dir):
            super().on_epoch_end(epoch, logs)

    def on_test_end(self, logs=None):
        with _tensorboard_writes(self.log_dir):
            super().on_test_end(logs)

    def on_train_end(self, logs=None):
        with _tensorboard_writes(self.log_dir):
            super().on_train_end(logs)


class TensorBoardImages:
    """Pictures for TensorBoard's Images tab in `folder` (its writer opened at the first one), or nowhere when
    `folder` is None."""

    def __init__(self, folder: Optional[Path]):
        self.folder, self.writer = folder, None

    def write(self, tag: str, images: np.ndarray, step: int) -> None:
        if self.folder is None:
            return
        with _tensorboard_writes(self.folder):
            self.writer = self.writer or tf.summary.create_file_writer(str(self.folder))
            with self.writer.as_default():
                tf.summary.image(tag, images, step=step, max_outputs=len(images))
            self.writer.flush()


class ReconstructionSnapshots(keras.callbacks.Callback):
    """Every `every` epochs, save fixed validation faces over their reconstructions.

    The picture goes to `folder/epoch_XXXX.png` and, when `tensorboard_dir` is
    given, to TensorBoard's Images tab (originals on top, reconstructions below).
    """

    def __init__(self, images: np.ndarray, folder: Path, every: int, save_grid, tensorboard_dir=None):
        super().__init__()
        self.images = images
        self.folder = Path(folder)
        self.every = every
        self.save_grid = save_grid
        self.tensorboard = TensorBoardImages(tensorboard_dir)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            # A direct call, not predict(): no cross-worker gather, so uneven splits are fine.
            reconstructions = keras.ops.convert_to_numpy(self.model(self.images, training=False))
            self.save_grid(
                [self.images, reconstructions],
                ["original", "reconstruction"],
                self.folder / f"epoch_{epoch + 1:04d}.png",
                title=f"epoch {epoch + 1}",
            )
            pairs = np.concatenate([self.images, np.clip(reconstructions, 0.0, 1.0)], axis=1)
            self.tensorboard.write("original over reconstruction", pairs, epoch)


class SampleSnapshots(keras.callbacks.Callback):
    """Every `every` epochs, draw `count` token grids from the prior being trained and save
    them decoded (to `folder/epoch_XXXX.png`, and to TensorBoard when `tensorboard_dir` is given).

    Args:
        decode: int token grids (N, h, w) -> images (N, H, W, C) in [0, 1] (the VQ-VAE's decoder).
        count: grids per snapshot; seed: the same seed every time, so the pictures show the
            prior changing, not the random draw.
    """

    def __init__(self, decode, count: int, folder: Path, every: int, save_grid, seed: int, tensorboard_dir=None):
        super().__init__()
        self.decode, self.count, self.folder, self.every = decode, count, Path(folder), every
        self.save_grid, self.seed, self.tensorboard = save_grid, seed, TensorBoardImages(tensorboard_dir)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        grids = self.model.sample_tokens(self.count, tf.constant([self.seed, 0], tf.int64))
        images = np.clip(keras.ops.convert_to_numpy(self.decode(grids)), 0.0, 1.0)
        self.save_grid([images], ["sample"], self.folder / f"epoch_{epoch + 1:04d}.png", title=f"epoch {epoch + 1}")
        self.tensorboard.write("samples", images, epoch)


TRAINING_STATE_ENTRY = "training_state.json"


def save_model_atomically(model: keras.Model, path: Path, training_state: Optional[dict] = None) -> None:
    """`model.save` through a temporary file: never a half-written `.keras` file.

    `training_state` (counters that belong with these weights: epochs done, best
    value, patience, seconds trained) is stored inside the same zip file, so the
    weights and their counters are replaced by one rename and always match.
    `keras.saving.load_model` ignores the extra entry.
    """

    def save(tmp: Path) -> None:
        model.save(tmp)
        if training_state is not None:
            with zipfile.ZipFile(tmp, "a") as archive:
                archive.writestr(TRAINING_STATE_ENTRY, json.dumps(training_state))

    write_atomically(path, save)


def read_training_state(path: Path) -> Optional[dict]:
    """The training state saved inside a `.keras` file by `save_model_atomically`, or None."""
    with zipfile.ZipFile(path) as archive:
        if TRAINING_STATE_ENTRY not in archive.namelist():
            return None
        return json.loads(archive.read(TRAINING_STATE_ENTRY))


class LossDiverged(TrainingError):
    """The loss became NaN or infinite, or jumped far above its best; the last good checkpoint is kept."""


class TrainingCheckpoint(keras.callbacks.Callback):
    """Best-by-validation model, resumable latest state, early stopping, NaN guard.

    Files in `folder`:
      best.keras    the model with the lowest `monitor` so far (from
                    `min_epoch_to_start_saving` on);
      latest.keras  the full training state: weights, optimizer (with its step
                    counter, which seeds revival), codebook and EMA statistics,
                    annealed commitment cost, and inside it the counters of
                    `state.json` for exactly these weights;
      state.json    epoch counter, best value, patience counter, training
                    seconds used, and whether the run finished.
    Every file is written to a temporary name and renamed, so an interrupted
    write leaves the previous good file in place. Shuffling and augmentation
    are functions of (seed, epoch, batch), so resuming from latest.keras
    repeats an uninterrupted run exactly (given deterministic ops and no time
    budget, whose learning-rate schedule follows the wall clock).

    Divergence stops training without saving the epoch's weights, and
    `divergence` says what happened: a non-finite loss, or (with
    `divergence_ratio`) a monitored loss above `divergence_ratio` x its best so
    far, which is how a collapsed VQ-VAE looks (no NaN, the decoder outputs the
    mean face). `state.json` then keeps the last good epoch's counters but counts
    the lost epoch's time, so a resumed run stays within its time budget.
    """

    def __init__(
        self,
        folder: Path,
        clock: TrainingClock,
        patience: int,
        min_epoch_to_start_saving: int = 0,
        monitor: str = "val_loss",
        state: Optional[dict] = None,
        divergence_ratio: Optional[float] = None,
    ):
        super().__init__()
        self.folder = Path(folder)
        self.clock = clock
        self.patience = patience
        self.min_epoch_to_start_saving = min_epoch_to_start_saving
        self.monitor = monitor
        self.divergence_ratio = divergence_ratio
        state = state or {}
        # state.json writes an infinite best (nothing saved yet) as null
        self.best = math.inf if state.get("best") is None else state["best"]
        self.wait = state.get("wait", 0)
        self.best_epoch = state.get("best_epoch")
        self.divergence: Optional[str] = None
        self.early_stopped = False
        self.epochs_done = state.get("epochs_done", 0)

    def state(self, finished: bool) -> dict:
        return {
            "epochs_done": self.epochs_done,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "monitor": self.monitor,
            "wait": self.wait,
            "train_seconds": self.clock.elapsed_seconds,
            "finished": finished,
        }

    def diverged(self, logs: dict) -> Optional[str]:
        """What went wrong in an epoch with these logs, or None when it trained normally."""
        if not all(math.isfinite(float(logs[k])) for k in ("loss", self.monitor) if k in logs):
            return "the loss became NaN or infinite"
        current = float(logs.get(self.monitor, logs["loss"]))
        limit = math.inf if self.divergence_ratio is None else self.divergence_ratio * self.best
        if current > limit:
            return (
                f"{self.monitor} jumped to {current:.5g}, {current / self.best:.1f}x its best ({self.best:.5g}, "
                f"epoch {self.best_epoch}): training collapsed"
            )
        return None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        problem = self.diverged(logs)
        if problem is not None:
            self.divergence = f"{problem} in epoch {epoch + 1}"
            self.model.stop_training = True
            if self.epochs_done:
                write_json_atomically(self.state(finished=False), self.folder / "state.json")
            return
        self.epochs_done = epoch + 1
        current = float(logs.get(self.monitor, logs["loss"]))
        improved = self.epochs_done >= self.min_epoch_to_start_saving and current < self.best
        if improved:
            self.best, self.best_epoch, self.wait = current, self.epochs_done, 0
        elif self.epochs_done >= self.min_epoch_to_start_saving:
            self.wait += 1
            if self.wait >= self.patience:
                self.early_stopped = True
                self.model.stop_training = True
        # latest.keras first: a run folder with a best.keras always has a latest.keras to resume from.
        state = self.state(finished=False)
        save_model_atomically(self.model, self.folder / "latest.keras", state)
        if improved:
            save_model_atomically(self.model, self.folder / "best.keras")
        write_json_atomically(state, self.folder / "state.json")
