"""Training-policy rules: annealing, revival, time budget, LR schedule, checkpoint guard."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from vqvae_class_keras import VectorQuantizerEMA
from vqvae_faces.callbacks import (
    CommitmentAnnealing,
    DeadCodeRevival,
    LearningRateDecay,
    ThroughputMeter,
    TrainingCheckpoint,
    TrainingClock,
)


def annealer(quantizer=None):
    return CommitmentAnnealing(
        quantizer, target_low=0.8, target_high=0.9, factor=2.0, decay=0.5, min_cost=0.1, max_cost=1.0
    )


def test_annealing_direction_and_clamps():
    rule = annealer()
    assert rule.next_cost(0.4, evenness=0.5) == pytest.approx(0.2)  # below band: decrease
    assert rule.next_cost(0.4, evenness=0.95) == pytest.approx(0.8)  # above band: increase
    assert rule.next_cost(0.4, evenness=0.85) == pytest.approx(0.2)  # inside: decay
    assert rule.next_cost(0.15, evenness=0.5) == pytest.approx(0.1)  # clamped at min
    assert rule.next_cost(0.7, evenness=0.99) == pytest.approx(1.0)  # clamped at max
    with pytest.raises(ValueError):
        CommitmentAnnealing(None, 0.9, 0.8, 2.0, 0.5, 0.1, 1.0)


@pytest.mark.parametrize(
    "counts, evenness, cost",
    [
        ([2.0, 2.0, 0.0, 0.0], 0.5, 0.2),  # two codes share the inputs: perplexity 2 of K=4, below the band
        ([1.0, 1.0, 1.0, 1.0], 1.0, 0.8),  # all four equally used: above the band
        ([0.7, 0.1, 0.1, 0.1], 0.6403, 0.2),  # exp(-(.7 ln .7 + 3 x .1 ln .1)) / 4 = 2.5611 / 4
    ],
)
def test_annealing_reads_the_evenness_of_the_ema_counts(counts, evenness, cost):
    quantizer = VectorQuantizerEMA(4, 2, commitment_cost=0.4)
    quantizer.build((None, 2))
    quantizer.ema_cluster_size.assign(np.array(counts, np.float32))
    logs = {"active_code_fraction": 0.95}  # a per-batch statistic the rule must not read
    annealer(quantizer).on_epoch_end(0, logs)
    assert logs["codebook_evenness"] == pytest.approx(evenness, abs=1e-4)
    assert quantizer.commitment_cost.numpy() == pytest.approx(cost)
    assert logs["commitment_cost"] == pytest.approx(cost)


def quantizer_with_usage(usage, dim=2):
    k = len(usage)
    quantizer = VectorQuantizerEMA(k, dim, codebook_init="uniform")
    quantizer.build((None, dim))
    quantizer.embeddings.assign(np.arange(k * dim, dtype=np.float32).reshape(k, dim))
    quantizer.ema_cluster_size.assign(np.asarray(usage, np.float32))
    quantizer.latent_sample.assign(np.full((k, dim), 100.0, np.float32))
    return quantizer


SEED = tf.constant([0, 0], tf.int64)


def test_revival_replaces_at_most_n_least_used_dead_codes():
    usage = [5.0, 0.1, 3.0, 0.5, 0.0, 0.2, 8.0, 0.3]
    quantizer = quantizer_with_usage(usage)
    before = quantizer.embeddings.numpy().copy()
    # mean usage 2.14: threshold 0.5 makes codes below 1.07 dead (0.1, 0.5, 0.0, 0.2, 0.3).
    revived = quantizer.revive_dead_codes(
        threshold=0.5,
        max_revivals=3,
        noise=0.0,
        source="encoder",
        seed=SEED,
    )
    assert int(revived) == 3
    after = quantizer.embeddings.numpy()
    moved = sorted(np.flatnonzero(np.any(after != before, axis=1)))
    assert moved == [1, 4, 5], "the three least-used dead codes (0.0, 0.1, 0.2)"
    np.testing.assert_allclose(after[moved], 100.0)
    mean_usage = np.mean(usage)
    np.testing.assert_allclose(quantizer.ema_cluster_size.numpy()[moved], mean_usage, rtol=1e-6)
    assert np.all(quantizer.ema_cluster_size.numpy()[moved] >= 0.5 * mean_usage), "not dead again at once"
    np.testing.assert_allclose(quantizer.ema_embedding_sum.numpy()[moved], 100.0 * mean_usage, rtol=1e-5)


def test_revival_from_live_codes_with_noise():
    quantizer = quantizer_with_usage([5.0, 0.0, 4.0, 0.0])
    quantizer.revive_dead_codes(0.5, 10, noise=0.01, source="codes", seed=SEED)
    codes = quantizer.embeddings.numpy()
    live = np.array([[0.0, 1.0], [4.0, 5.0]])
    # Each revived code is a live code plus 0.01 x RMS(candidates) x N(0, 1) per component; the RMS is at most
    # that of (4, 5), sqrt(20.5), so 4 standard deviations bound the offset by 0.04 x sqrt(20.5) = 0.18.
    for index in (1, 3):
        nearest = np.abs(live - codes[index]).max(axis=1).min()
        assert 0 < nearest < 0.04 * np.sqrt(20.5), "a noisy copy of a live code"


def test_revival_with_no_dead_codes_changes_nothing():
    quantizer = quantizer_with_usage([2.0, 3.0])
    before = [w.numpy().copy() for w in quantizer.weights]
    assert int(quantizer.revive_dead_codes(0.5, 5, 0.01, "encoder", SEED)) == 0
    for old, weight in zip(before, quantizer.weights):
        np.testing.assert_array_equal(old, weight.numpy())


def test_all_dead_codebook_is_reinitialised_whole():
    quantizer = quantizer_with_usage([0.0] * 6)
    revived = quantizer.revive_dead_codes(0.5, 2, 0.0, "encoder", SEED)
    assert int(revived) == 6
    np.testing.assert_allclose(quantizer.embeddings.numpy(), 100.0)


def test_revival_callback_runs_every_n_batches_and_reports():
    quantizer = quantizer_with_usage([5.0, 0.1, 3.0, 0.5, 0.0, 0.2, 8.0, 0.3])
    callback = DeadCodeRevival(quantizer, threshold=0.5, max_revivals_per_batch=1, every_n_batches=2, noise=0.0)
    model = FakeModel()
    callback.set_model(model)
    callback.on_train_begin()
    reports = []
    for epoch in range(2):
        callback.on_epoch_begin(epoch)
        for batch in range(3):
            model.optimizer.iterations.assign_add(1)
            callback.on_train_batch_end(batch)
        logs = {}
        callback.on_epoch_end(epoch, logs)
        reports.append(logs["revived_codes"])
    assert reports == [1, 2], "batches 2, 4 and 6 across the two epochs"


class FakeModel:
    def __init__(self):
        self.stop_training = False
        self.optimizer = keras.optimizers.Adam(1.0)


class FakeTime:
    """A clock that moves only when the test says so."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_time_limit_stops_training_and_progress_follows_it():
    now = FakeTime()
    clock = TrainingClock(total_epochs=100, max_minutes=1.0, previous_seconds=45.0, clock=now)
    clock.set_model(FakeModel())
    clock.on_train_begin()
    now.now += 3.0  # 48 of 60 s: the time fraction 0.8 dominates the epoch fraction 0.01
    assert clock.elapsed_seconds == 48.0 and clock.progress(1) == pytest.approx(0.8)
    clock.on_train_batch_end(0)
    assert not clock.model.stop_training
    now.now += 12.5
    clock.on_train_batch_end(1)
    assert clock.model.stop_training and clock.time_limit_reached
    assert clock.progress(1) == 1.0


def test_throughput_counts_batch_time_after_the_first_epoch():
    """Epoch 1 (compilation) is left out; epoch 2's 3 batches take 2 s and hold 20 images (the last
    batch of 8 only 4 of them): 10 images/s, not 12."""
    now = FakeTime()
    meter = ThroughputMeter(batch_size=8, num_images=20, clock=now)
    for epoch, seconds_per_batch in enumerate([10.0, 2.0 / 3]):
        meter.on_epoch_begin(epoch)
        for batch in range(3):
            now.now += seconds_per_batch
            meter.on_train_batch_end(batch)
        now.now += 5.0  # validation and callbacks after the last batch: not training time
        logs = {}
        meter.on_epoch_end(epoch, logs)
    assert meter.images_per_second == pytest.approx(20 / 2.0) and logs["images_per_second"] == meter.images_per_second


def test_linear_schedule_values():
    schedule = LearningRateDecay(2.0, TrainingClock(total_epochs=10), "linear", final_fraction=0.1)
    assert schedule.rate(0.0) == pytest.approx(2.0)
    assert schedule.rate(0.25) == pytest.approx(2.0 * (0.1 + 0.9 * 0.75))
    assert schedule.rate(1.0) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="Received: shape='step'"):
        LearningRateDecay(1.0, TrainingClock(total_epochs=10), "step")


def test_cosine_schedule_values():
    clock = TrainingClock(total_epochs=10)
    schedule = LearningRateDecay(1.0, clock, "cosine", final_fraction=0.0)
    assert schedule.rate(0.0) == pytest.approx(1.0)
    assert schedule.rate(0.5) == pytest.approx(0.5)
    assert schedule.rate(1.0) == pytest.approx(0.0, abs=1e-12)
    schedule.set_model(FakeModel())
    schedule.on_epoch_begin(5)
    assert float(schedule.model.optimizer.learning_rate.numpy()) == pytest.approx(0.5)


def test_checkpoint_refuses_to_save_a_non_finite_loss(tmp_path):
    clock = TrainingClock(total_epochs=3)
    checkpoint = TrainingCheckpoint(tmp_path, clock, patience=2)
    checkpoint.set_model(FakeModel())
    checkpoint.on_epoch_end(0, {"loss": math.nan, "val_loss": 1.0})
    assert checkpoint.divergence == "the loss became NaN or infinite in epoch 1" and checkpoint.model.stop_training
    assert list(tmp_path.iterdir()) == []
