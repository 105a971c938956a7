"""The calibrated verdict: image score, zero-iteration maps, the frame range gate.

Shared by the reference evaluation (eproj.train) and the runtime (eproj.runtime);
NumPy and OpenCV only. What a model's calibration stores (``calibration["decision"]``
in model.pt, ``"decision"`` in a bundle's manifest) and how it is applied:

- ``zero_iteration_map_scale``: a tile that took no projection step has
  projection == x0, so DSSIM(x0, projection) is all zeros whether or not the tile
  is defective. Its map is instead DSSIM(x0, f(x0)), the reconstruction's map,
  times this scale (the projection's pixel threshold over the reconstruction's),
  so its mask is exactly the reconstruction method's mask (fail closed: a tile the
  loop never moved is judged by what was computed, never reported clean by default).
- ``gate_lr``: the zero-iteration gate (None: none); a tile whose Lr(x0) is at most
  this (or under the stop threshold at x0) is finished at iteration 0. With
  ``gate_first_update`` (true when absent: every calibration before the choice) it
  keeps the first update, which the step at x0 has paid for, and takes no further
  step; its map DSSIM(x0, x1) is evidence, not zeros. Without, it takes no step: one
  forward pass (f(x0) and Lr(x0), no gradient), judged by its reconstruction's map,
  scaled as above. ``gate_rec_error`` (None: none):
  the gate also requires the largest pixel of the tile's reconstruction error
  (x0 - f(x0))^2 (channel mean) to be at most this, so a tile with a small defect its
  Lr(x0) hides still goes on to the projection.
- ``map_scale``: per step count t, the factor of a tile's map (t = 0: of its
  reconstruction map): the map of an iterate grows with t, and the factors put every
  tile's map on one scale (the normal validation images' quantile at each t maps to the
  pixel threshold), so tiles stopped after few steps and after many are comparable;
- ``image_score``: one of ``IMAGE_SCORES``, chosen on validation data; a frame's
  score is the maximum over its tiles; ``score_threshold`` the verdict's threshold.
- ``min_region_area``: pixels (at model resolution) of the largest connected
  region of the mask that normal validation images never reach.
- ``frame_range``: per statistic of ``FRAME_STATISTICS`` it bounds, the [low, high]
  range outside which a frame is unlike any normal frame (None: no bound on that side).
  Calibration bounds Lr(x0) and the pixels' standard deviation over the normal validation
  images and the training inputs. A range with the map's mean (a low bound only, from
  earlier calibrations) is still applied; it is no longer calibrated, because a tile
  explained as well as the training data has a map near zero and is not unlike normal.

The verdict (``verdict``): a frame is defective when any of its tiles lies outside
the frame range (reason "unlike any normal frame"), when its mask has a connected
region of at least ``min_region_area`` pixels, or when its score exceeds
``score_threshold``. A non-finite statistic or score counts as outside and over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

IMAGE_SCORES = ("dssim_max", "dssim_area", "rec_error_max", "lr0")
FRAME_STATISTICS = ("lr0", "map_mean", "x0_std")
UNLIKE_NORMAL = "unlike any normal frame"
GATE_REASON = "gate"  # the stop reason of a tile finished by the zero-iteration gate


def tile_std(x0: np.ndarray) -> np.ndarray:
    """(T,) float64 standard deviation of each tile's pixels, (T, C, S, S) -> (T,)."""
    return np.asarray(x0, np.float64).reshape(len(x0), -1).std(axis=1)


def rec_error_map(x0: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """(x0 - f(x0))^2 averaged over channels: (T, C, S, S) float32 pair -> (T, S, S) float32."""
    return ((x0 - reconstruction) ** 2).mean(axis=1).astype(np.float32)


def tile_scores(dssim: np.ndarray, rec_error: np.ndarray, lr0: np.ndarray,
                pixel_threshold: float) -> dict[str, np.ndarray]:
    """Every candidate image score per tile.

    Args:
        dssim: (T, S, S) the anomaly map (DSSIM to the projection, or the scaled
            reconstruction map for zero-iteration tiles).
        rec_error: (T, S, S) (x0 - f(x0))^2 averaged over channels.
        lr0: (T,) Lr(x0). pixel_threshold: the map's segmentation threshold.
    Returns:
        name -> (T,) float64 for each name of ``IMAGE_SCORES``; ``dssim_area`` is the
        fraction of the tile's pixels above the pixel threshold.
    """
    t = len(dssim)
    flat = dssim.reshape(t, -1)
    return {"dssim_max": flat.max(axis=1).astype(np.float64),
            "dssim_area": (flat > pixel_threshold).mean(axis=1).astype(np.float64),
            "rec_error_max": rec_error.reshape(t, -1).max(axis=1).astype(np.float64),
            "lr0": np.asarray(lr0, np.float64)}


def largest_region(mask: np.ndarray) -> int:
    """Pixels of the largest 8-connected region of an (H, W) bool mask (0 if empty)."""
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    if not mask.any():
        return 0
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    return int(stats[1:count, cv2.CC_STAT_AREA].max())


def outside(value: float, bounds: list[float | None] | tuple[float | None, float | None]) -> bool:
    """True when ``value`` is not within [low, high] (a bound None: none on that side; a NaN is outside)."""
    low, high = bounds
    return not ((low is None or low <= value) and (high is None or value <= high) and value == value)


@dataclass(frozen=True)
class Decision:
    """A calibration's ``decision`` section (see the module docstring)."""

    image_score: str = "dssim_max"
    score_threshold: float = float("inf")
    min_region_area: int | None = None
    frame_range: dict[str, list[float]] | None = None
    zero_iteration_map_scale: float = 1.0
    gate_lr: float | None = None
    map_scale: tuple[float, ...] | None = None
    gate_rec_error: float | None = None
    gate_first_update: bool = True

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, score_threshold: float) -> "Decision":
        """From a stored section; None (a model or bundle calibrated before it existed) gives
        the old verdict: max of the map against ``score_threshold``, no gate, no range, and
        zero-iteration tiles judged by their unscaled reconstruction map."""
        if not values:
            return cls(score_threshold=float(score_threshold))
        if values["image_score"] not in IMAGE_SCORES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORES}, got {values['image_score']!r}")
        gate = values.get("gate_lr")
        area = values.get("min_region_area")
        scale = values.get("map_scale")
        gate_rec = values.get("gate_rec_error")
        return cls(values["image_score"], float(values["score_threshold"]),
                   None if area is None else int(area), values.get("frame_range"),
                   float(values.get("zero_iteration_map_scale", 1.0)), None if gate is None else float(gate),
                   None if scale is None else tuple(float(v) for v in scale),
                   None if gate_rec is None else float(gate_rec), bool(values.get("gate_first_update", True)))

    def frame_statistics(self, lr0: np.ndarray, dssim: np.ndarray, x0_std: np.ndarray) -> dict[str, float]:
        """The frame-level statistics of one frame's T tiles (``FRAME_STATISTICS``: Lr(x0), the
        map's mean, the standard deviation of the tile's pixels) from lr0 (T,), dssim (T, S, S)
        and x0_std (T,): the extreme of each over the tiles, on the side farther from the
        normal range (max, or min below it)."""
        per_tile = {"lr0": np.asarray(lr0, np.float64),
                    "map_mean": dssim.reshape(len(dssim), -1).mean(axis=1).astype(np.float64),
                    "x0_std": np.asarray(x0_std, np.float64)}
        out = {}
        for name, values in per_tile.items():
            low = (self.frame_range or {}).get(name, (None, None))[0]
            out[name] = float(values.min()) if low is not None and values.min() < low else float(values.max())
        return out

    def verdict(self, score: float, mask: np.ndarray, statistics: dict[str, float]) -> tuple[bool, str]:
        """(defect, reason) of one frame from its score, (H, W) bool mask at model
        resolution and ``frame_statistics``; reason is "" for the plain verdict."""
        for name, bounds in (self.frame_range or {}).items():
            if name in statistics and outside(statistics[name], bounds):
                return True, UNLIKE_NORMAL
        if self.min_region_area is not None and largest_region(mask) >= self.min_region_area:
            return True, ""
        return not (score <= self.score_threshold), ""


def map_factors(iterations: np.ndarray, map_scale: tuple[float, ...] | None, zero_map_scale: float) -> np.ndarray:
    """(T,) float32 factor of each tile's map for its step count (``map_scale[t]``, the last one
    beyond its length); without ``map_scale``: ``zero_map_scale`` at t = 0 and 1 otherwise."""
    iterations = np.asarray(iterations)
    if map_scale is None:
        return np.where(iterations == 0, zero_map_scale, 1.0).astype(np.float32)
    scale = np.asarray(map_scale, np.float32)
    return scale[np.minimum(iterations, len(scale) - 1)]


def frame_range(values: dict[str, np.ndarray], margin: float,
                low_only: tuple[str, ...] = ()) -> dict[str, list[float | None]]:
    """[min / margin, max * margin] of each statistic over normal validation tiles
    (non-negative statistics; the range is a factor ``margin`` wider on each side);
    the statistics in ``low_only`` get no high bound (None)."""
    return {name: [float(np.min(v)) / margin, None if name in low_only else float(np.max(v)) * margin]
            for name, v in values.items()}
