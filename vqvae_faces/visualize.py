"""Pictures: image grids, maps of values over a token grid, training curves, codebook usage (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from vqvae_faces.atomic_files import write_atomically  # noqa: E402


def save_figure(figure, path: Path) -> None:
    """Save through a temporary file, so a picture is never half-written."""
    try:
        write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=100, bbox_inches="tight"))
    finally:
        plt.close(figure)


GRID_GAP = 2  # pixels of white between the faces of an image grid


def image_mosaic(rows: list[np.ndarray], gap: int = GRID_GAP) -> np.ndarray:
    """The faces of `rows` tiled into one RGB picture, float in [0, 1].

    Args:
        rows: one array per row, each (N, H, W, C) with C = 1 or 3, floats in [0, 1] or uint8;
            every row is cut to the shortest row's N.
        gap: white pixels between neighbouring faces.

    Output shape: (R * (H + gap) - gap, N * (W + gap) - gap, 3).
    """
    count = min(len(r) for r in rows)
    tiles = []
    for images in rows:
        images = np.asarray(images[:count])
        images = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
        tiles.append(np.clip(np.broadcast_to(images, images.shape[:3] + (3,)), 0.0, 1.0))
    height, width = tiles[0].shape[1:3]
    mosaic = np.ones((len(rows) * (height + gap) - gap, count * (width + gap) - gap, 3), np.float32)
    for r, images in enumerate(tiles):
        for c, image in enumerate(images):
            top, left = r * (height + gap), c * (width + gap)
            mosaic[top : top + height, left : left + width] = image
    return mosaic


def save_image_grid(rows: list[np.ndarray], labels: list[str], path: Path, title: Optional[str] = None) -> None:
    """One row per entry of `rows`, each (N, H, W, C) in [0, 1] (or uint8); same N for all rows.

    The faces are drawn as one mosaic (one image for matplotlib, whatever the number
    of faces), with each row's label at its left.
    """
    count, height = min(len(r) for r in rows), np.asarray(rows[0]).shape[1]
    figure, axis = plt.subplots(figsize=(1.2 * count + 1.2, 1.3 * len(rows) + 0.4))
    axis.imshow(image_mosaic(rows), interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([r * (height + GRID_GAP) + height / 2 for r in range(len(rows))], labels, fontsize=9)
    axis.tick_params(length=0)
    for spine in axis.spines.values():
        spine.set_visible(False)
    if title:
        axis.set_title(title, fontsize=10)  # right above the faces, whatever the figure's aspect
    save_figure(figure, path)


def heat_tiles(values: np.ndarray, size: tuple[int, int], top: float, colormap: str = "magma") -> np.ndarray:
    """Grids of values as colour pictures: cell (i, j) of picture n filled with the colour of values[n, i, j].

    Args:
        values: (N, h, w) numbers, 0 drawn in the colormap's first colour.
        size: (H, W) of the pictures, multiples of (h, w).
        top: the value drawn in the colormap's last colour; larger values are drawn in it too.
        colormap: a matplotlib colormap's name.

    Output shape: (N, H, W, 3), floats in [0, 1].
    """
    values = np.asarray(values, np.float64)
    height, width = size
    if values.ndim != 3 or height % values.shape[1] or width % values.shape[2]:
        raise ValueError(f"need (N, h, w) values whose h, w divide size {size}, received shape {values.shape}")
    if not top > 0:
        raise ValueError(f"top must be > 0, received {top}")
    colours = matplotlib.colormaps[colormap](np.clip(values / top, 0.0, 1.0))[..., :3]
    cells = np.repeat(colours, height // values.shape[1], axis=1)
    return np.repeat(cells, width // values.shape[2], axis=2).astype(np.float32)


def plot_training_curves(history_csv: Path, path: Path) -> None:
    """Losses (train and validation) and, when present, code usage over epochs."""
    history = pd.read_csv(history_csv)
    history = history.drop_duplicates("epoch", keep="last").sort_values("epoch")
    epochs = history["epoch"] + 1
    usage_columns = [c for c in ("active_code_fraction", "val_active_code_fraction") if c in history]
    panels = 2 if usage_columns else 1
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.8), squeeze=False)
    loss_axis = axes[0, 0]
    for column in ("loss", "val_loss", "reconstruction_loss", "val_reconstruction_loss"):
        if column in history:
            loss_axis.plot(epochs, history[column], label=column)
    loss_axis.set_yscale("log")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_title("losses")
    loss_axis.legend(fontsize=8)
    if usage_columns:
        usage_axis = axes[0, 1]
        for column in usage_columns:
            usage_axis.plot(epochs, history[column], label=column)
        usage_axis.set_ylim(0.0, 1.05)
        usage_axis.set_xlabel("epoch")
        usage_axis.set_title("fraction of codes used per batch")
        usage_axis.legend(fontsize=8)
    save_figure(figure, path)


def plot_code_usage(token_counts: np.ndarray, path: Path, title: str) -> None:
    """Bar chart of how often each code is used, sorted by frequency."""
    counts = np.sort(np.asarray(token_counts))[::-1]
    figure, axis = plt.subplots(figsize=(7, 3))
    axis.bar(np.arange(len(counts)), counts, width=1.0)
    axis.set_xlabel("code (sorted by use)")
    axis.set_ylabel("tokens")
    axis.set_title(title, fontsize=10)
    save_figure(figure, path)
