"""Shared fixtures: a small synthetic LFW tree and archive, tiny run settings."""

from __future__ import annotations

import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as vqvae_face_main.py sets it
# One TensorFlow thread per process (and per program a test starts, which inherits these), so two
# xdist workers and their programs do not oversubscribe the two cores (measured: a few percent less
# CPU time for the suite). The test that needs another thread count sets its own.
for variable in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(variable, "1")
TWO_THREADS = {"TF_NUM_INTRAOP_THREADS": "2", "TF_NUM_INTEROP_THREADS": "2", "OMP_NUM_THREADS": "2"}
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEOPLE = ["Ada_Lovelace", "Alan_Turing", "Grace_Hopper", "John_Doe", "Jane_Roe", "Kurt_Godel", "Emmy_Noether"]
IMAGES_PER_PERSON = 3

# Settings that make a training run take seconds: 16x16 images, 4x4 token grid, K=16.
TINY_RUN = [
    "data.image_size=16",
    "encoder_filters=[8,16]",
    "decoder_filters=[16,8]",
    "residual_hidden_channels=8",
    "num_residual_blocks=0",  # the command-line fixture and the model tests have residual blocks
    "embedding_dim=4",
    "num_embeddings=16",
    "latent_dim=4",
    "batch_size=16",
    "epochs=1",
    "max_train_minutes=null",
    # op by op: tracing the train step costs more than a toy run's few steps (COMPILED undoes it)
    "run_eagerly=true",
    # no snapshots or augmentation (each costs a second or two of every run): the tests that are
    # about them, and the exact-resume tests, turn them on with ON_THE_FLY
    "snapshot_every=100",
    "data.augmentation.enabled=false",
    "token_search_steps=2",  # the search has its own tests; one end-to-end check uses the full 50 steps
    # the token prior of the default config, as small: 1 block of width 16, 8 samples, 2 codec settings
    "transformer.width=16",
    "transformer.num_layers=1",
    "transformer.num_heads=2",
    "sampling.eval_samples=8",
    "codec.compare_lambdas=[0,1]",
]
# Reconstruction snapshots every epoch and on-the-fly augmentation, on top of TINY_RUN.
ON_THE_FLY = ["snapshot_every=1", "data.augmentation.enabled=true"]
# The train step traced into a graph, as users run it: the command-line, exact-resume and multi-worker tests.
COMPILED = ["run_eagerly=false"]


def face_image(seed: int, size: int = 250) -> np.ndarray:
    """A smooth, face-sized RGB test picture (uint8, size x size x 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [
        127 + 100 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y + rng.uniform()))
        for _ in range(3)
    ]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def token_log_probs(logits, tokens) -> np.ndarray:
    """NumPy oracle of a prior's code: log-probability (nats, float64) of each token (B, h, w) under
    its logits (B, h, w, K), by a log-softmax computed here."""
    logits = np.asarray(logits, np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return np.take_along_axis(log_probs, np.asarray(tokens)[..., None], axis=-1)[..., 0]


def write_lfw_tree(root: Path, people=PEOPLE, per_person=IMAGES_PER_PERSON) -> Path:
    """`root/lfw-deepfunneled/<Person>/<Person>_000N.jpg`, plus one corrupt JPEG and one non-image."""
    top = root / "lfw-deepfunneled"
    for p, person in enumerate(people):
        folder = top / person
        folder.mkdir(parents=True)
        for i in range(per_person):
            Image.fromarray(face_image(100 * p + i)).save(folder / f"{person}_{i + 1:04d}.jpg", quality=95)
    good = (top / people[0] / f"{people[0]}_0001.jpg").read_bytes()
    (top / people[1] / f"{people[1]}_0099.jpg").write_bytes(good[: len(good) // 3])
    (top / people[2] / "notes.txt").write_text("not an image")
    return top


def write_archive(tree: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as handle:
        handle.add(tree, arcname=tree.name)
    return archive


@pytest.fixture(autouse=True)
def no_determinism_left_over():
    """`deterministic: true` turns TensorFlow's op determinism on for the whole process (and with it,
    Keras turns XLA off); turn it off after each test, so no test depends on which ran before it."""
    yield
    if "tensorflow" in sys.modules:
        from tensorflow.python.framework import config  # the switch-off has no public name

        config.disable_op_determinism()


@pytest.fixture(scope="session")
def lfw_tree(tmp_path_factory) -> Path:
    return write_lfw_tree(tmp_path_factory.mktemp("lfw"))


@pytest.fixture(scope="session")
def lfw_archive(lfw_tree, tmp_path_factory) -> Path:
    return write_archive(lfw_tree, tmp_path_factory.mktemp("archive") / "lfw-deepfunneled.tgz")


# Files in decreasing order of their time on the 2-core machine (`pytest --durations=0`, summed per
# file). pytest.ini gives each xdist worker whole files (--dist loadfile) in this order
# (--no-loadscope-reorder), so the long files start first and the short ones fill the gaps at the end.
SLOWEST_FIRST = [
    "test_distributed.py",
    "test_prior_run.py",
    "test_disk_and_signals.py",
    "test_token_prior.py",
    "test_resume.py",
    "test_cli.py",
    "test_codec.py",
    "test_model.py",
    "test_faults.py",
    "test_ready_made.py",
    "test_face_alignment.py",
    "test_saved_run.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
