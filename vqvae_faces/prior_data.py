"""Token grids for a token prior: a VQ-VAE run's faces tokenized once per checkpoint and cached.

A prior learns the grids the codec will send, so its training data are the VQ-VAE's
tokens of the training split (the validation split for model choice, the test split
for the reported figures). Tokenizing thousands of faces takes minutes, so the grids
are cached as `.npz`, keyed by the SHA-256 of the VQ-VAE checkpoint and of the split's
faces (and the token search's settings when the prior learns searched tokens): retraining
the VQ-VAE, or other faces, gives a new cache file.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqvae_faces.atomic_files import save_npz_atomically
from vqvae_faces.config import ExperimentConfig
from vqvae_faces.errors import TrainingError
from vqvae_faces.inference import load_trained_model, tokenize
from vqvae_faces.lfw_files import SPLIT_PARTS, FaceSet, images_fingerprint, load_split
from vqvae_faces.run_folder import RunPaths, file_digest, run_lock

log = logging.getLogger("vqvae_faces.prior_data")

TOKENS_CACHE_VERSION = 1
TOKENIZE_BATCH = 64  # faces per encoder call when a prior's training data are tokenized


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


def tokens_cache_path(
    cache_dir: Path, checkpoint: Path, faces: FaceSet, split: dict, flipped: bool, search: tuple = (0, 0.0)
) -> Path:
    """Where the grids of `checkpoint`'s tokens of `faces` split as `split` are cached; `search`
    is (steps, step size) of the token search that chose them, (0, 0.0) for the nearest codes."""
    indices = np.concatenate([split[part] for part in SPLIT_PARTS])
    key = f"v{TOKENS_CACHE_VERSION}-{file_digest(checkpoint)}-{images_fingerprint(faces, indices)}-{int(flipped)}"
    if search[0] > 0:
        key += f"-search{int(search[0])}-{float(search[1])!r}"
    return Path(cache_dir) / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def tokenize_splits(
    model,
    checkpoint: Path,
    faces: FaceSet,
    split: dict,
    cache_dir: Path,
    batch_size: int,
    flipped: bool = False,
    search: tuple = (0, 0.0),
) -> TokenSplits:
    """The token grids of every split of `faces`, from the cache when it has them.

    Args:
        model: the VQ-VAE loaded from `checkpoint` (its `encode_to_tokens` is used).
        checkpoint: the `.keras` file the model came from (its bytes key the cache).
        faces, split: the faces and the index arrays of "train", "val", "test".
        cache_dir: folder of the `.npz` caches.
        batch_size: faces per encoder call.
        flipped: also tokenize the horizontally mirrored faces of each split.
        search: (steps, step size) of `VQVAE.search_tokens`; (0, 0.0): the encoder's nearest codes.
    """
    path = tokens_cache_path(cache_dir, checkpoint, faces, split, flipped, search)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as cached:
                grids = {key[len("grids_") :]: cached[key] for key in cached.files if key.startswith("grids_")}
                names = {key[len("names_") :]: cached[key] for key in cached.files if key.startswith("names_")}
            log.info("token grids of %s from cache %s", checkpoint, path)
            return TokenSplits(grids, names)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            log.warning("token cache %s is unreadable (%s); tokenizing again", path, error or type(error).__name__)
    # One encoder pass over every split (and the mirrored faces), then cut into the parts.
    parts = [(part, split[part], False) for part in SPLIT_PARTS]
    parts += [(f"{part}_flipped", split[part], True) for part in SPLIT_PARTS] if flipped else []
    images = np.concatenate(
        [faces.subset(index)[:, :, ::-1] if mirror else faces.subset(index) for _, index, mirror in parts]
    )
    every_grid = tokenize(model, np.ascontiguousarray(images), batch_size, *search)
    grids, names, start = {}, {}, 0
    for part, index, _ in parts:
        grids[part], names[part] = every_grid[start : start + len(index)], faces.names[index]
        start += len(index)
    log.info(
        "tokenized %d faces (every split%s) with %s%s",
        len(images),
        " and its mirror" if flipped else "",
        checkpoint,
        f", {search[0]} search steps" if search[0] else "",
    )
    arrays = {f"grids_{part}": grid for part, grid in grids.items()}
    arrays.update({f"names_{part}": name for part, name in names.items()})
    save_npz_atomically(path, compressed=True, **arrays)
    return TokenSplits(grids, names)


@dataclass(frozen=True)
class PriorSource:
    """What a prior run learns from: its VQ-VAE (model, checkpoint file and the file's digest),
    that run's split of the faces, and the token grids of every split."""

    vqvae: object
    checkpoint: Path
    digest: str
    split: dict
    tokens: TokenSplits


def load_prior_source(config: ExperimentConfig, run_name: str, faces: FaceSet, paths: RunPaths) -> PriorSource:
    """Load the VQ-VAE run the prior run `run_name` (its folders: `paths`) learns from (`tokens_from`) and
    tokenize its splits (cached).

    The prior keeps the VQ-VAE's split, so its test faces are the VQ-VAE's test faces.
    A `TrainingError` naming the VQ-VAE run when it has no trained model.
    """
    run = config.runs[run_name]
    source_run = config.runs[run.tokens_from]
    search = (source_run.token_search_steps, source_run.token_search_step_size) if run.searched_tokens else (0, 0.0)
    source = paths.sibling(run.tokens_from)
    if source.trained_model() is None:
        raise TrainingError(
            f"run {run_name!r} learns the tokens of VQ-VAE run {run.tokens_from!r}, which has no trained model in "
            f"{source.checkpoints}: train it first (python vqvae_face_main.py --run {run.tokens_from})."
        )
    with run_lock(source.checkpoints, exclusive=False):  # nobody retrains the VQ-VAE while it is read
        model, checkpoint = load_trained_model(source, run.tokens_from)
        split = load_split(source.split, faces)
        tokens = tokenize_splits(
            model,
            checkpoint,
            faces,
            split,
            paths.data_cache,
            TOKENIZE_BATCH,
            flipped=run.flipped_faces,
            search=search,
        )
        digest = file_digest(checkpoint)
    return PriorSource(model, checkpoint, digest, split, tokens)
