"""`--encode` and `--decode`: photos to `.vqf` files (or one `.vqfs` container) and back, with the
models of an --out folder.

Every output name is decided and checked before any work: an existing file is never
replaced without `--overwrite`, and two inputs never write the same output. Each file is
written atomically, so an interrupted run leaves whole files only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from pathlib import Path
from typing import Optional

import keras
import numpy as np
from PIL import Image

from vqvae_faces import lfw_files
from vqvae_faces.atomic_files import write_atomically
from vqvae_faces.codec import CODEC_BATCH, FaceCodec
from vqvae_faces.config import DataConfig, ExperimentConfig
from vqvae_faces.errors import ConfigError, DataError, EvaluationError
from vqvae_faces.face_alignment import DetectorOnDemand
from vqvae_faces.model_settings import load_model
from vqvae_faces.run_folder import RunPaths, file_digest, run_lock
from vqvae_faces.vqf_format import CONTAINER_MAGIC, MAX_CONTAINER_FACES, Fingerprints

PREVIEW_FACES = 16  # faces shown by --preview
PROGRESS_FROM = 10  # photos from which reading them shows a progress bar (finding faces takes a while)

log = logging.getLogger("vqvae_faces.codec")

# The largest .vqf or .vqfs file read: a .vqf is a few hundred bytes, a container of the most faces it may
# hold (MAX_CONTAINER_FACES) a few tens of megabytes.
MAX_CODED_BYTES = 1 << 26


def choose_prior_run(config: ExperimentConfig, selected: Optional[list[str]]) -> str:
    """The prior run whose models code the files: the one selected with --run, else the first in the config."""
    priors = [name for name in (selected or config.runs) if config.runs[name].model == "prior"]
    if not priors:
        raise ConfigError(
            f'--encode/--decode need a prior run (model "prior") among the selected runs; runs: {sorted(config.runs)}.'
        )
    return priors[0]


@contextlib.contextmanager
def opened_codec(config: ExperimentConfig, prior_run: str, out: Path, locked: bool = True):
    """The codec of `prior_run` and its VQ-VAE, trained under `out`; their folders are locked (shared) meanwhile,
    unless not `locked` (the ready-made models: read-only, never trained)."""
    prior_paths = RunPaths.for_run(out, prior_run)
    vqvae_paths = prior_paths.sibling(config.runs[prior_run].tokens_from)
    files = {}
    for name, paths in ((prior_run, prior_paths), (config.runs[prior_run].tokens_from, vqvae_paths)):
        files[name] = paths.trained_model()
        if files[name] is None:
            raise EvaluationError(
                f"no trained model for run {name!r} in {paths.checkpoints}: train it first "
                f"(python vqvae_face_main.py --run {name} --out {out})."
            )
    with contextlib.ExitStack() as locks:
        if locked:
            locks.enter_context(run_lock(prior_paths.checkpoints, exclusive=False))
            locks.enter_context(run_lock(vqvae_paths.checkpoints, exclusive=False))
        vqvae_file, prior_file = files[config.runs[prior_run].tokens_from], files[prior_run]
        fingerprints = Fingerprints.from_digests(
            file_digest(vqvae_file), file_digest(prior_file), str(vqvae_file), str(prior_file)
        )
        settings = config.runs[prior_run]
        step_size = config.runs[settings.tokens_from].token_search_step_size
        yield FaceCodec(
            load_model(vqvae_file), load_model(prior_file), fingerprints, settings.codec.search_steps, step_size
        )


def _check_targets(sources: list[Path], targets: list[Path], overwrite: bool) -> None:
    """Refuse two sources writing one target and, without `overwrite`, any existing target."""
    seen: dict[Path, Path] = {}
    for source, target in zip(sources, targets):
        if target in seen:
            raise DataError(f"{seen[target]} and {source} would both be written to {target}: rename one of them.")
        seen[target] = source
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise DataError(f"{shown} already exist{'s' if len(existing) == 1 else ''}: pass --overwrite to replace them.")


def check_inputs(paths: list[Path], max_bytes: Optional[int] = None) -> None:
    """Refuse a missing input, or a photo over `max_bytes` (`data.max_file_bytes`; `None`: a `.vqf` or
    `.vqfs` file, at most `MAX_CODED_BYTES`), before any model is loaded."""
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path} does not exist or is not a file.")
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise DataError(f"{path} is larger than data.max_file_bytes={max_bytes}.")
        if max_bytes is None and size > MAX_CODED_BYTES:
            raise DataError(f"{path} is larger than the largest .vqfs container ({MAX_CODED_BYTES} bytes).")


def _read(path: Path, max_bytes: Optional[int] = None) -> bytes:
    check_inputs([path], max_bytes)
    return path.read_bytes()


def photo_settings(codec: FaceCodec, config: ExperimentConfig) -> tuple[DataConfig, int]:
    """The data settings photos are cropped with, their `image_size` the one the VQ-VAE was trained on
    (whatever the current config says), and the VQ-VAE's image channels."""
    _, height, _, channels = codec.vqvae.get_build_config()["input_shape"]
    if height != config.data.image_size:
        log.info("photos resized to %dx%d, as the VQ-VAE was trained (data.image_size=%d)", height, height, height)
    return dataclasses.replace(config.data, image_size=height), channels


def encode_photos(
    codec: FaceCodec,
    photos: list[Path],
    config: ExperimentConfig,
    rate_lambda: float,
    to=None,
    overwrite=False,
    into: Optional[Path] = None,
    preview: bool = False,
) -> list[Path]:
    """Write `<photo stem>.vqf` for each photo, or with `into` one `.vqfs` container of them all
    (in the order given); with `preview`, also `<first file's stem>.preview.png`: the faces as sent (the
    aligned crops) above the faces the files decode to. Returns the files written."""
    if into is not None and len(photos) > MAX_CONTAINER_FACES:
        raise DataError(f"{len(photos)} photos: a .vqfs container holds at most {MAX_CONTAINER_FACES} faces.")
    targets = [into] if into is not None else [(to or path.parent) / (path.stem + ".vqf") for path in photos]
    preview_path = targets[0].with_name(targets[0].stem + ".preview.png") if preview else None
    written = targets + ([preview_path] if preview else [])
    _check_targets(photos[: len(targets)] + ([photos[0]] if preview else []), written, overwrite)
    faces = _read_photos(photos, config, *photo_settings(codec, config))
    for folder in {target.parent for target in targets}:
        folder.mkdir(parents=True, exist_ok=True)
    bar = keras.utils.Progbar(len(photos), unit_name="photo")
    if into is not None:
        encoded = codec.encode(np.stack(faces), rate_lambda, on_group=bar.add, files=False)
        write_atomically(into, lambda tmp: tmp.write_bytes(encoded.container))
        log.info("wrote %s: %d faces, %.0f bits per face", into, len(faces), 8 * len(encoded.container) / len(faces))
        grids = encoded.grids
    else:
        sizes, grids = [], []
        for start in range(0, len(photos), CODEC_BATCH):
            encoded = codec.encode(np.stack(faces[start : start + CODEC_BATCH]), rate_lambda, container=False)
            for data, target in zip(encoded.files, targets[start : start + CODEC_BATCH]):
                write_atomically(target, lambda tmp, data=data: tmp.write_bytes(data))
                sizes.append(len(data))
            grids.append(encoded.grids)
            bar.add(len(encoded.files))
        average = np.mean(sizes)
        log.info("wrote %d .vqf files, %.0f bytes on average (%.0f bits)", len(sizes), average, 8 * average)
        grids = np.concatenate(grids)
    if preview:
        _write_preview(codec, faces[:PREVIEW_FACES], grids[:PREVIEW_FACES], len(photos), preview_path)
    return written


def _read_photos(photos: list[Path], config: ExperimentConfig, settings: DataConfig, channels: int) -> list[np.ndarray]:
    """Each photo as the face the codec sends (`lfw_files.decode_photo`), its notes logged; a `DataError`
    naming the first photo that is unusable, before anything is written."""
    detector = DetectorOnDemand()
    bar = keras.utils.Progbar(len(photos), unit_name="photo read") if len(photos) >= PROGRESS_FROM else None
    faces = []
    for photo in photos:
        try:
            face, notes = lfw_files.decode_photo(_read(photo, config.data.max_file_bytes), settings, channels, detector)
        except DataError as error:
            raise DataError(f"{photo}: {error}") from None
        for note in notes:
            log.warning("%s: %s", photo, note)
        faces.append(face)
        if bar is not None:
            bar.add(1)
    return faces


def _write_preview(codec: FaceCodec, faces: list[np.ndarray], grids: np.ndarray, total: int, path: Path) -> None:
    """The faces as sent above the faces their files decode to (the first `PREVIEW_FACES`)."""
    from vqvae_faces.visualize import save_image_grid

    decoded = codec.pixels(grids)
    plural = "s" if total > 1 else ""
    shown = f"the first {len(faces)} of {total} photos" if total > len(faces) else f"{total} photo{plural}"
    save_image_grid([np.stack(faces), decoded], ["sent", "decoded"], path, title=shown)
    log.info("wrote %s: the faces as sent and as the files decode", path)


def decode_files(codec: FaceCodec, files: list[Path], to=None, overwrite=False) -> list[Path]:
    """Write `<file stem>.png` for each `.vqf` file and `<file stem>-<n>.png` for the n-th face (from 1)
    of each `.vqfs` container; returns the pictures written."""
    contents = [_read(path) for path in files]
    singles, containers = [], []  # (source, bytes, target) and (source, bytes, targets)
    for path, data in zip(files, contents):  # every header checked before any work
        folder = to or path.parent
        if data[:2] == CONTAINER_MAGIC:
            _, count, _, _ = codec.reader.container(data, str(path))
            digits = len(str(count))
            containers.append((path, data, [folder / f"{path.stem}-{n:0{digits}d}.png" for n in range(1, count + 1)]))
        else:
            codec.reader.file(data, str(path))
            singles.append((path, data, folder / f"{path.stem}.png"))
    sources = [path for path, _, _ in singles] + [path for path, _, targets in containers for _ in targets]
    targets = [target for _, _, target in singles] + [target for _, _, group in containers for target in group]
    _check_targets(sources, targets, overwrite)
    bar = keras.utils.Progbar(len(targets), unit_name="face")
    for start in range(0, len(singles), CODEC_BATCH):
        group = singles[start : start + CODEC_BATCH]
        grids = codec.decode([data for _, data, _ in group], [str(path) for path, _, _ in group])
        _write_faces(codec, grids, [target for _, _, target in group])
        bar.add(len(grids))
    for path, data, group in containers:
        _write_faces(codec, codec.decode_container(data, str(path), on_group=bar.add), group)
    return targets


def _write_faces(codec: FaceCodec, grids: np.ndarray, targets: list[Path]) -> None:
    """Decode token grids to pictures and write each as a PNG (its folder made when the first is written,
    so a file that does not decode leaves no new folder behind)."""
    for folder in {target.parent for target in targets}:
        folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(grids), CODEC_BATCH):
        faces = codec.pixels(grids[start : start + CODEC_BATCH])
        for pixels, target in zip(faces, targets[start : start + CODEC_BATCH]):
            write_atomically(target, lambda tmp, pixels=pixels: _save_png(pixels, tmp))


def _save_png(pixels: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
