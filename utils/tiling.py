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
