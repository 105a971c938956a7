"""Cutting images into tiles of the model size and blending maps back; NumPy only,
shared by evaluation (eproj.train) and the runtime.

Tiles start every ``stride`` pixels along each axis (``stride`` = ``size``: side by
side; ``size // 2``: each pixel inside two tiles per axis). Where a side is not
``size + k * stride``, one more tile ends exactly at the border, so every pixel is
covered and no tile is padded. ``untile`` blends the tiles that cover a pixel with
weights that fall off towards each tile's border (``blend_window``), so a pixel's
value comes mostly from the tiles that hold it near their centre. Where tiles do not
overlap (stride = size and sides that are multiples of size), ``untile`` gives back
exactly the placed tiles.
"""

from __future__ import annotations

import numpy as np

from eproj.errors import DataError


def tile_origins(length: int, size: int, stride: int | None = None) -> list[int]:
    """Start offsets of the tiles along one side of ``length`` pixels: 0, stride, 2 stride, ...,
    and ``length - size`` where the last regular tile stops short of the border."""
    stride = size if stride is None else stride
    if not 1 <= stride <= size:
        raise DataError(f"tile stride must lie in [1, {size}] (the tile size), got {stride}")
    if length < size:
        raise DataError(f"a side of {length} pixels is shorter than the {size}-pixel tiles")
    origins = list(range(0, length - size + 1, stride))
    if origins[-1] != length - size:
        origins.append(length - size)
    return origins


def tile_grid(shape: tuple[int, int], size: int, stride: int | None = None) -> list[tuple[int, int]]:
    """Row-major (y, x) origins of the tiles covering an (H, W) image."""
    h, w = shape
    if h < size or w < size:
        raise DataError(f"image of {w}x{h} is smaller than the {size}x{size} tiles")
    return [(y, x) for y in tile_origins(h, size, stride) for x in tile_origins(w, size, stride)]


def tile(image: np.ndarray, size: int, stride: int | None = None) -> list[np.ndarray]:
    """Cut (H, W, ...) into row-major (size, size, ...) views at ``tile_grid``'s origins.

    H, W >= size; ``stride`` defaults to ``size`` (side by side, the last tile of a row
    or column moved back to end at the border)."""
    return [image[y:y + size, x:x + size] for y, x in tile_grid(image.shape[:2], size, stride)]


def blend_window(size: int) -> np.ndarray:
    """(size, size) float64 weights of one tile's pixels in ``untile``: the outer product
    of a tent that rises from 1/size at the border pixels to 1 - 1/size at the centre
    ones. Two tiles half a tile apart have tents that add up to 1 where they overlap."""
    i = np.arange(size, dtype=np.float64)
    tent = np.minimum(i + 0.5, size - i - 0.5) / (size / 2.0)
    return np.outer(tent, tent)


def untile(tiles: np.ndarray, shape: tuple[int, int], stride: int | None = None) -> np.ndarray:
    """Inverse of ``tile`` for maps: (T, size, size, ...) -> (H, W, ...), overlaps blended.

    Each pixel is the ``blend_window``-weighted mean of the tiles covering it (in
    float64, returned in the tiles' dtype: integers rounded, bool maps the weighted vote > 1/2).
    A pixel covered by one tile gets that tile's value exactly.
    """
    tiles = np.asarray(tiles)
    size = tiles.shape[1]
    grid = tile_grid(shape, size, stride)
    if len(tiles) != len(grid):
        raise DataError(f"an image of {shape[1]}x{shape[0]} in {size}x{size} tiles at stride "
                        f"{stride or size} takes {len(grid)} tiles, got {len(tiles)}")
    extra = tiles.shape[3:]
    weight = blend_window(size).reshape((size, size) + (1,) * len(extra))
    total = np.zeros(tuple(shape) + extra, np.float64)
    weights = np.zeros(tuple(shape) + (1,) * len(extra), np.float64)
    for (y, x), part in zip(grid, tiles):
        total[y:y + size, x:x + size] += weight * part
        weights[y:y + size, x:x + size] += weight
    blended = total / weights
    if tiles.dtype == bool:
        return blended > 0.5
    if np.issubdtype(tiles.dtype, np.integer):
        return np.rint(blended).astype(tiles.dtype)
    return blended.astype(tiles.dtype)
