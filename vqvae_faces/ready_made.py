"""Where `--encode` and `--decode` find their models: the runs trained under `--out`, the folder `--models`
names, or else the ready-made models shipped with the package (`vqvae_faces/models/`, see its README).

A models folder is laid out as an --out folder: `checkpoints/<run>/best.keras`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from vqvae_faces.errors import ConfigError
from vqvae_faces.run_folder import RunPaths

log = logging.getLogger("vqvae_faces.codec")

READY_MADE = Path(__file__).resolve().parent / "models"


def has_runs(folder: Path, runs: list[str]) -> bool:
    """Whether `folder` holds a trained model of every one of `runs`."""
    return all(RunPaths.for_run(folder, run).trained_model() is not None for run in runs)


def models_folder(out: Path, runs: list[str], models: Optional[str]) -> tuple[Path, bool]:
    """The folder whose trained `runs` the codec uses, and whether it is the shipped one (read-only: not
    locked). `models` (--models) wins; then `out` when it holds the runs; then the ready-made models when
    they are these runs; else `out`, whose missing runs the codec then reports."""
    if models is not None:
        if not has_runs(Path(models), runs):
            raise ConfigError(f"--models {models} holds no trained runs {runs} (checkpoints/<run>/best.keras).")
        return Path(models), False
    if has_runs(out, runs) or not has_runs(READY_MADE, runs):
        return out, False
    log.info("no trained runs %s in %s: using the ready-made models in %s (see its README.md)", runs, out, READY_MADE)
    return READY_MADE, True
