"""Token grids for a token prior: a VQ-VAE run's faces tokenized once per checkpoint and cached.

A prior learns the grids the codec will send, so its training data are the VQ-VAE's
tokens of the training split (the validation split for model choice, the test split
for the reported figures). Tokenizing thousands of faces takes minutes, so the grids
are cached as `.npz`, keyed by the SHA-256 of the VQ-VAE checkpoint and of the split's
faces: retraining the VQ-VAE, or other faces, gives a new cache file.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqvae_faces.atomic_files import save_npz_atomically
from vqvae_faces.evaluation import tokenize
from vqvae_faces.lfw_files import SPLIT_PARTS, FaceSet, images_fingerprint

log = logging.getLogger("vqvae_faces.prior_data")

TOKENS_CACHE_VERSION = 1


@dataclass(frozen=True)
class TokenSplits:
    """int16 token grids (N, h, w) of each split, with the faces' file names (N,).

    With `flipped`, each split also holds the grids of its horizontally mirrored faces
    (`<part>_flipped`), a cheap way to double the prior's training data.
    """

    grids: dict[str, np.ndarray]
    names: dict[str, np.ndarray]

    def __getitem__(self, part: str) -> np.ndarray:
        return self.grids[part]


def file_digest(path: Path) -> str:
    """SHA-256 (hex, 16 digits) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def tokens_cache_path(cache_dir: Path, checkpoint: Path, faces: FaceSet, split: dict, flipped: bool) -> Path:
    """Where the grids of `checkpoint`'s tokens of `faces` split as `split` are cached."""
    indices = np.concatenate([split[part] for part in SPLIT_PARTS])
    key = f"v{TOKENS_CACHE_VERSION}-{file_digest(checkpoint)}-{images_fingerprint(faces, indices)}-{int(flipped)}"
    return Path(cache_dir) / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def tokenize_splits(
    model, checkpoint: Path, faces: FaceSet, split: dict, cache_dir: Path, batch_size: int, flipped: bool = False
) -> TokenSplits:
    """The nearest-code token grids of every split of `faces`, from the cache when it has them.

    Args:
        model: the VQ-VAE loaded from `checkpoint` (its `encode_to_tokens` is used).
        checkpoint: the `.keras` file the model came from (its bytes key the cache).
        faces, split: the faces and the index arrays of "train", "val", "test".
        cache_dir: folder of the `.npz` caches.
        batch_size: faces per encoder call.
        flipped: also tokenize the horizontally mirrored faces of each split.
    """
    path = tokens_cache_path(cache_dir, checkpoint, faces, split, flipped)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as cached:
                grids = {key[len("grids_") :]: cached[key] for key in cached.files if key.startswith("grids_")}
                names = {key[len("names_") :]: cached[key] for key in cached.files if key.startswith("names_")}
            log.info("token grids of %s from cache %s", checkpoint, path)
            return TokenSplits(grids, names)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            log.warning("token cache %s is unreadable (%s); tokenizing again", path, error or type(error).__name__)
    grids, names = {}, {}
    for part in SPLIT_PARTS:
        images = faces.subset(split[part])
        names[part] = faces.names[split[part]]
        grids[part] = tokenize(model, images, batch_size)
        if flipped:
            grids[f"{part}_flipped"] = tokenize(model, np.ascontiguousarray(images[:, :, ::-1]), batch_size)
            names[f"{part}_flipped"] = names[part]
        log.info("tokenized %d %s faces with %s", len(images), part, checkpoint)
    arrays = {f"grids_{part}": grid for part, grid in grids.items()}
    arrays.update({f"names_{part}": name for part, name in names.items()})
    save_npz_atomically(path, compressed=True, **arrays)
    return TokenSplits(grids, names)
