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
    "num_residual_blocks=1",
    "embedding_dim=4",
    "num_embeddings=16",
    "latent_dim=4",
    "batch_size=16",
    "epochs=1",
    "max_train_minutes=null",
    "snapshot_every=1",
    "data.augmentation.enabled=true",
    "token_search_steps=2",  # the search has its own tests; one end-to-end check uses the full 50 steps
    # the token prior of the default config, as small: 1 block of width 16, 8 samples, 2 codec settings
    "prior.width=16",
    "prior.num_layers=1",
    "prior.num_heads=2",
    "sampling.eval_samples=8",
    "codec.compare_lambdas=[0,1]",
]


def face_image(seed: int, size: int = 250) -> np.ndarray:
    """A smooth, face-sized RGB test picture (uint8, size x size x 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [
        127 + 100 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y + rng.uniform()))
        for _ in range(3)
    ]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


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


@pytest.fixture(scope="session")
def lfw_tree(tmp_path_factory) -> Path:
    return write_lfw_tree(tmp_path_factory.mktemp("lfw"))


@pytest.fixture(scope="session")
def lfw_archive(lfw_tree, tmp_path_factory) -> Path:
    return write_archive(lfw_tree, tmp_path_factory.mktemp("archive") / "lfw-deepfunneled.tgz")
