"""Cutting images into tiles of the model size and stitching maps back; NumPy only,
shared by evaluation (eproj.train) and the runtime."""

from __future__ import annotations

import numpy as np

from eproj.errors import DataError


def tile(image: np.ndarray, size: int) -> list[np.ndarray]:
    """Cut (H, W, C) with H, W multiples of size into row-major (size, size, C) tiles."""
    h, w = image.shape[:2]
    if h % size or w % size:
        raise DataError(f"image of {w}x{h} cannot be tiled by {size}x{size}")
    return [image[y:y + size, x:x + size] for y in range(0, h, size) for x in range(0, w, size)]


def untile(tiles: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of ``tile`` for maps: (T, size, size, ...) -> (H, W, ...)."""
    h, w = shape
    size = tiles.shape[1]
    rows = [np.concatenate(list(tiles[r * (w // size):(r + 1) * (w // size)]), axis=1)
            for r in range(h // size)]
    return np.concatenate(rows, axis=0)
