"""Tiles of large images: where they start, their ids and their boundary labels. Training cuts
images into tiles here, and prediction places its sliding windows here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from utils.image_io import ImageSet


def tile_positions(length: int, size: int, overlap: int = 0) -> list[int]:
    """Start offsets of the tiles that cover ``[0, length)`` with tiles of ``size``.

    Tiles step by ``size - overlap``; when that does not end exactly at the border, one more tile
    is aligned to the border (it overlaps its neighbour by more than ``overlap``), so every pixel
    is covered and no tile leaves the image.

    Raises:
        ValueError: ``length < size``, ``size < 1`` or ``overlap`` not in ``[0, size)``.
    """
    if size < 1:
        raise ValueError(f"size={size} must be >= 1")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap={overlap} must be in [0, size={size})")
    if length < size:
        raise ValueError(f"length={length} is smaller than the tile size {size}")
    starts = list(range(0, length - size + 1, size - overlap))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def boundary_label(mask: np.ndarray) -> int:
    """1 when a tile's class mask contains a class boundary, else 0.

    Two 4-adjacent pixels of different classes exist exactly when the mask is not constant (the
    pixel grid is connected), which is cheaper to test.
    """
    return int(mask.min() != mask.max())


#: Fill label of a tile that has a boundary (no single class fills it): ignored by the loss.
NO_FILL = -100


def fill_label(mask: np.ndarray) -> int:
    """The one class of a tile's mask without a boundary, or :data:`NO_FILL` when it has one."""
    return NO_FILL if boundary_label(mask) else int(mask.flat[0])


def tile_id(image_id: str, y: int, x: int) -> str:
    return f"{image_id}_y{y:04d}_x{x:04d}"


def tiles_of(
    images: ImageSet, image_indices: Sequence[int], input_size: int, overlap: int
) -> list[tuple[int, int, int]]:
    """``(image index, y, x)`` of every tile of the given images, row by row."""
    tiles = []
    for i in image_indices:
        e = images.entries[i]
        for y in tile_positions(e.height, input_size, overlap):
            for x in tile_positions(e.width, input_size, overlap):
                tiles.append((i, y, x))
    return tiles


# ---------------------------------------------------------------------------------------------
# sliding-window prediction
# ---------------------------------------------------------------------------------------------
def window_starts(length: int, size: int, step: int) -> list[int]:
    """Start offsets of evenly spaced windows of ``size`` covering ``[0, length)``, whose real step
    never exceeds ``step`` (nnU-Net's placement): the first window starts at 0, the last ends at
    ``length``. A ``length`` smaller than ``size`` gives one window at 0 (the caller pads).

    Raises:
        ValueError: ``size < 1`` or ``step`` not in ``[1, size]``.
    """
    if size < 1 or not 1 <= step <= size:
        raise ValueError(f"size={size} must be >= 1 and step={step} in [1, size]")
    if length <= size:
        return [0]
    n = -(-(length - size) // step) + 1  # ceil
    actual = (length - size) / (n - 1)
    return [int(round(actual * i)) for i in range(n)]


def gaussian_importance_map(size: int, sigma_scale: float = 0.125) -> np.ndarray:
    """(size, size) float32 weights of a prediction window: a Gaussian of σ = size·sigma_scale
    centred on the window, peak 1, clamped below at its smallest value (≥ 1e-3) so that a border
    pixel never has weight 0. The same map as MONAI's ``compute_importance_map(mode="gaussian")``,
    so blended results agree with ``sliding_window_inference(mode="gaussian")``."""
    x = np.arange(size, dtype=np.float32) - (size - 1) / 2.0
    g = np.exp(x**2 / np.float32(-2 * (size * sigma_scale) ** 2)).astype(np.float32)
    weights = g[:, None] * g[None, :]
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)
