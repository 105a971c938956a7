"""Tiles (eproj.tiles) and the runtime's frame layout at the working scale (eproj.runtime.frames)."""

from __future__ import annotations

import numpy as np
import pytest

from eproj.errors import ConfigError, DataError
from eproj.runtime.frames import Layout, check_tiling, recorded_scale, to_batch, to_frame
from eproj.tiles import blend_window, tile, tile_grid, tile_origins, untile


def _side_by_side(tiles: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Tiles of a grid with no overlap placed side by side: what untile gave before strides."""
    h, w = shape
    size = tiles.shape[1]
    per_row = w // size
    return np.concatenate([np.concatenate(list(tiles[r * per_row:(r + 1) * per_row]), axis=1)
                           for r in range(h // size)], axis=0)


def test_multiples_of_the_size_tile_side_by_side_exactly_as_before():
    image = np.random.default_rng(0).random((384, 256, 3)).astype(np.float32)
    tiles = np.stack(tile(image, 128))
    assert len(tiles) == 6 and tile_grid((384, 256), 128) == [(y, x) for y in (0, 128, 256) for x in (0, 128)]
    np.testing.assert_array_equal(untile(tiles, (384, 256)), _side_by_side(tiles, (384, 256)))
    np.testing.assert_array_equal(untile(tiles, (384, 256)), image)


@pytest.mark.parametrize("shape", [(840, 840), (700, 1000), (1080, 1920), (128, 129)])
@pytest.mark.parametrize("stride", [64, 128])
def test_any_size_is_covered_without_padding(shape, stride):
    """Every pixel lies in a tile, every tile lies inside the image, and untile of an
    image's own tiles gives the image back bit for bit."""
    image = np.random.default_rng(1).random(shape).astype(np.float32)
    grid = tile_grid(shape, 128, stride)
    covered = np.zeros(shape, int)
    for y, x in grid:
        assert 0 <= y <= shape[0] - 128 and 0 <= x <= shape[1] - 128
        covered[y:y + 128, x:x + 128] += 1
    assert covered.min() >= 1
    tiles = np.stack(tile(image, 128, stride))
    assert tiles.shape == (len(grid), 128, 128)
    np.testing.assert_array_equal(untile(tiles, shape, stride), image)


def test_origins_end_at_the_border():
    assert tile_origins(840, 128, 64) == [0, 64, 128, 192, 256, 320, 384, 448, 512, 576, 640, 704, 712]
    assert tile_origins(256, 128, 64) == [0, 64, 128]
    assert tile_origins(128, 128, 64) == [0]
    assert tile_origins(300, 128) == [0, 128, 172]


def test_overlaps_are_blended_towards_each_tile_centre():
    """Half a tile apart, the tents add up to 1; where tiles overlap, each pixel leans to
    the tile that holds it nearer its centre, and a constant map stays constant."""
    window = blend_window(8)
    assert window.max() == pytest.approx((7 / 8) ** 2) and window.min() == pytest.approx(1 / 64)
    tent = np.sqrt(np.diag(window))
    np.testing.assert_allclose(tent[4:] + tent[:4], 1.0)
    tiles = np.stack([np.zeros((8, 8), np.float32), np.ones((8, 8), np.float32)])  # at x = 0 and x = 4
    row = untile(tiles, (8, 12), stride=4)[0]
    np.testing.assert_array_equal(row[:4], 0.0)
    np.testing.assert_array_equal(row[8:], 1.0)
    assert np.all(np.diff(row[4:8]) > 0) and row[4] < 0.5 < row[7]
    constant = np.full((9, 8, 8), 0.3, np.float32)
    np.testing.assert_allclose(untile(constant, (16, 16), stride=4), 0.3, rtol=1e-7)
    masks = untile(np.stack([np.zeros((8, 8), bool), np.ones((8, 8), bool)]), (8, 12), stride=4)
    assert masks.dtype == bool and not masks[0, :6].any() and masks[0, 6:].all()


def test_tiling_errors_say_what_was_expected():
    with pytest.raises(DataError, match="image of 100x90 is smaller than the 128x128 tiles"):
        tile(np.zeros((90, 100)), 128)
    with pytest.raises(DataError, match=r"tile stride must lie in \[1, 128\].*got 0"):
        tile(np.zeros((256, 256)), 128, 0)
    with pytest.raises(DataError, match="takes 9 tiles, got 4"):
        untile(np.zeros((4, 128, 128)), (256, 256), 64)


def test_frames_are_brought_to_the_working_scale_and_back():
    frame = (np.random.default_rng(2).random((1024, 1024)) * 255).astype(np.uint8)
    x0, layouts, _ = to_batch(frame, 128, 1, "tile", scale=0.5)
    assert x0.shape == (49, 1, 128, 128)  # 512 x 512 at the working scale, tiles every 64 pixels
    assert layouts == [Layout(0, 49, (1024, 1024), (512, 512), 64)]
    maps = x0[:, 0]
    back = to_frame(maps, layouts[0], "tile")
    assert back.shape == (1024, 1024)
    x0, layouts, _ = to_batch(frame[:840, :700], 128, 1, "tile", scale=512 / 700, stride=128)
    assert layouts[0].working == (614, 512) and layouts[0].stride == 128 and len(x0) == 5 * 4
    with pytest.raises(ConfigError, match="scale must be a finite number > 0"):
        to_batch(frame, 128, 1, "tile", scale=float("nan"))
    with pytest.raises(DataError, match="1024 x 1024 is 102 x 102 at the working scale 0.1"):
        to_batch(frame, 128, 1, "tile", scale=0.1)


def test_bundles_without_a_recorded_scale_tile_at_their_frames_own_size():
    assert recorded_scale({"size": 128, "fit": "tile"}) == 1.0
    assert recorded_scale({"size": 128, "fit": "resize", "scale": None}) == 1.0
    assert check_tiling(128, recorded_scale({"size": 128, "fit": "tile", "scale": 0.5}), None) == (0.5, 64)
    for bad in (0, -1.0, "0.5", float("inf"), True):
        with pytest.raises(ConfigError, match="scale must be a finite number > 0"):
            check_tiling(128, recorded_scale({"scale": bad}), None)
