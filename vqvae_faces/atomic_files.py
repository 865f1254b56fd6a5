"""Crash-safe file writes: write a temporary file beside the target, fsync it, rename it.

An interrupted write (Ctrl-C, SIGKILL, full disk) leaves the previous file in
place and never a half-written one. Every file the program produces goes
through these helpers.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from vqvae_faces.errors import StorageError


def partial_path(path: Path) -> Path:
    """The temporary name for `path`, keeping its suffix (`best.keras` -> `best.partial.<pid>.keras`).

    The process id keeps two processes that write the same file at once (two runs
    building one data cache) out of each other's temporary file; the last rename wins.
    """
    path = Path(path)
    return path.with_name(f"{path.stem}.partial.{os.getpid()}{path.suffix}")


def fsync_replace(tmp: Path, final: Path) -> None:
    """Flush `tmp` to disk, then atomically rename it to `final` (and flush the folder entry)."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    directory = os.open(Path(final).parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_atomically(path: Path, write) -> None:
    """Call `write(tmp_path)` to produce the file, then move it into place; clean up on failure.

    An `OSError` (disk full, permission denied, read-only file system) becomes a
    `StorageError` whose message names `path` and the cause; the previous file
    at `path`, if any, is untouched.
    """
    path = Path(path)
    tmp = partial_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        fsync_replace(tmp, path)
    except BaseException as error:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(error, OSError) and not isinstance(error, StorageError):
            raise StorageError(cannot_write_message(path, error)) from None
        raise


def cannot_write_message(path: Path, error: OSError) -> str:
    """One line for a failed write: the path, the cause and what to do."""
    cause = error.strerror or str(error) or type(error).__name__
    return (
        f"cannot write {path}: {cause}. Files written before it are intact; free some disk space or fix "
        "the folder's permissions, then run the same command again to resume."
    )


def move_aside(path: Path) -> Path:
    """Rename a corrupt file to `<name>.corrupt-<time>` (kept for the user, out of the program's way)."""
    path = Path(path)
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, target)
    return target


def json_safe(value):
    """`value` with every non-finite float (inf, -inf, nan) replaced by None, so it is valid JSON."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_text_atomically(text: str, path: Path) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomically(data: dict, path: Path) -> None:
    """Strict JSON: non-finite floats (a perfect reconstruction's infinite PSNR) are written as null."""
    write_text_atomically(json.dumps(json_safe(data), indent=2, allow_nan=False), path)


def save_npz_atomically(path: Path, compressed: bool = False, **arrays) -> None:
    """`np.savez` (or `savez_compressed`) of `arrays`, without pickled objects."""
    save = np.savez_compressed if compressed else np.savez

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            save(handle, **arrays)

    write_atomically(path, write)
