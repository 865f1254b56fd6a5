"""Crash-safe file writes: write a temporary file beside the target, fsync it, rename it.

An interrupted write (Ctrl-C, SIGKILL, full disk) leaves the previous file in
place and never a half-written one. Every file the program produces goes
through these helpers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


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
    """Call `write(tmp_path)` to produce the file, then move it into place; clean up on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        write(tmp)
        fsync_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(text: str, path: Path) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomically(data: dict, path: Path) -> None:
    write_text_atomically(json.dumps(data, indent=2), path)


def save_npz_atomically(path: Path, compressed: bool = False, **arrays) -> None:
    """`np.savez` (or `savez_compressed`) of `arrays`, without pickled objects."""
    save = np.savez_compressed if compressed else np.savez

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            save(handle, **arrays)

    write_atomically(path, write)
