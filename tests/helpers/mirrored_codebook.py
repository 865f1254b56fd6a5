"""Train a tiny VQ-VAE a few steps on one device and with MirroredStrategy over two
logical CPUs, from the same initial weights, for both codebook initialisations; print
the codebooks as JSON, with the largest difference between a tiny token prior's weights
after the same steps on one device and on two replicas. Usage: mirrored_codebook.py FOLDER
(where checkpoints go).

Run as a separate process: logical devices must be configured before TensorFlow starts.
"""

import contextlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as vqvae_face_main.py sets it
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from vqvae_class_keras import VQVAE  # noqa: E402
from vqvae_faces.token_prior import CausalTransformer  # noqa: E402

STEPS = 3
# One strategy for every model: strategies made one after another in a process can reuse each
# other's collective keys, and models of other shapes then meet in one all-reduce.
STRATEGY = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
FOLDER = sys.argv[1]
images = np.random.default_rng(0).random((STEPS * 16, 16, 16, 3)).astype("float32")


def make_model(codebook_init):
    keras.utils.set_random_seed(0)
    model = VQVAE(
        image_channels=3,
        encoder_filters=[8, 16],
        decoder_filters=[16, 8],
        num_residual_blocks=1,
        residual_hidden_channels=8,
        activation="relu",
        reconstruction_loss="mse",  # a per-batch weighting would differ between one device and two replicas
        ssim_weight=0.0,
        embedding_dim=4,
        num_embeddings=16,
        decay=0.8,
        codebook_init=codebook_init,
        seed=0,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    model.build(images.shape)
    return model


class RecordCodebook(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = []

    def on_train_batch_end(self, batch, logs=None):
        variable = self.model.quantizer.embeddings.value
        copies = getattr(variable, "values", (variable,))
        self.steps.append([np.asarray(c.numpy()).tolist() for c in copies])


def codebooks_per_step(model):
    recorder = RecordCodebook()
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(16)
    model.fit(dataset, epochs=1, callbacks=[recorder], verbose=0, shuffle=False)
    return recorder.steps


def compare(codebook_init, with_single_device):
    """Codebooks after each step on two replicas (and on one device, from the same initial weights,
    when `with_single_device`), and a reload check of the mirrored model."""
    single = make_model(codebook_init)
    initial = single.get_weights()
    strategy = STRATEGY
    with strategy.scope():
        mirrored = make_model(codebook_init)
    mirrored.set_weights(initial)
    records = {"mirrored": codebooks_per_step(mirrored), "single": []}
    if with_single_device:
        records["single"] = codebooks_per_step(single)
    checkpoint = os.path.join(FOLDER, f"mirrored-{codebook_init}.keras")
    mirrored.save(checkpoint)
    reloaded = keras.saving.load_model(checkpoint, safe_mode=True)
    reload_difference = float(np.abs(np.asarray(reloaded(images)) - np.asarray(mirrored(images))).max())
    return {"replicas": strategy.num_replicas_in_sync, "reload_difference": reload_difference, **records}


def prior_steps(strategy=None):
    """A tiny prior's weights before and after STEPS steps of SGD on the same global batches."""
    tokens = np.random.default_rng(1).integers(0, 16, (STEPS * 16, 4, 4)).astype("int32")
    with strategy.scope() if strategy else contextlib.nullcontext():
        keras.utils.set_random_seed(0)
        prior = CausalTransformer(16, (4, 4), width=16, num_heads=2, num_layers=1)
        prior.compile(optimizer=keras.optimizers.SGD(0.5))
        prior(tokens[:1])
    before = [w.numpy() for w in prior.trainable_weights]
    prior.fit(tf.data.Dataset.from_tensor_slices(tokens).batch(16), epochs=1, verbose=0, shuffle=False)
    return before, [w.numpy() for w in prior.trainable_weights]


def compare_prior():
    """Largest weight difference between one device and two replicas, and the largest weight change."""
    (start, single), (_, mirrored) = prior_steps(), prior_steps(STRATEGY)
    difference = max(float(np.abs(a - b).max()) for a, b in zip(single, mirrored))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(single, start))
    return {"difference": difference, "moved": moved}


# Everything in one process: TensorFlow starts once. Only the uniform start is compared with one
# device: a data start samples its codes from replica 0's half of the batch.
print(json.dumps({"uniform": compare("uniform", True), "data": compare("data", False), "prior": compare_prior()}))
