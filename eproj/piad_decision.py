"""PIAD's calibrated verdict, shared by the reference evaluation (eproj.train.piad_calibrate),
the export (eproj.export.piad_onnx) and the runtime (eproj.runtime.piad); NumPy and OpenCV only.

A PIAD calibration's ``decision``: a frame is defective when its tiles' pixel std leaves the
range of the normal validation and training tiles ("unlike any normal frame"), when the mask
of its decision map (the feature map over its pixel threshold) holds a connected region of
``min_region_area`` model pixels or more ("region"), or when its score A(x), the largest of its
tiles', exceeds ``score_threshold`` ("score").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from eproj.decision import UNLIKE_NORMAL, largest_region, outside
from eproj.errors import ConfigError

PIAD_BUNDLE_FORMAT = "eproj-piad-bundle"
PIAD_MAPS = ("feature", "dssim")  # the pixel maps; ``feature`` decides the mask


@dataclass(frozen=True)
class PIADDecision:
    """A PIAD calibration's ``decision``: the image score A(x) against ``score_threshold``
    (a frame's score is the largest of its tiles'), the mask of the ``map`` ("feature" or
    "dssim") against ``pixel_threshold`` and its largest region against ``min_region_area``,
    and ``frame_range`` (statistic -> [low, high]; here the tiles' pixel std, ``x0_std``)."""

    score_threshold: float
    pixel_threshold: float
    map: str = "feature"
    min_region_area: int | None = None
    frame_range: dict[str, list[float | None]] | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PIADDecision":
        if values.get("map", "feature") not in PIAD_MAPS:
            raise ConfigError(f"PIAD decision map must be one of {PIAD_MAPS}, got {values.get('map')!r}")
        area = values.get("min_region_area")
        return cls(float(values["score_threshold"]), float(values["pixel_threshold"]), values.get("map", "feature"),
                   None if area is None else int(area), values.get("frame_range"))

    def to_dict(self) -> dict[str, Any]:
        return {"score_threshold": self.score_threshold, "pixel_threshold": self.pixel_threshold, "map": self.map,
                "min_region_area": self.min_region_area, "frame_range": self.frame_range}

    def verdict(self, score: float, mask: np.ndarray, x0_std: np.ndarray) -> tuple[bool, str]:
        """(defect, reason) of one frame: its score (the max over its tiles), its (H, W) bool mask
        and its tiles' pixel std (T,). Outside the frame range first (reason "unlike any normal
        frame"), then a mask region of ``min_region_area`` pixels or more ("region"), then the
        score over the threshold ("score"); a NaN score counts as over. Reason "" when normal."""
        std = np.asarray(x0_std, np.float64)
        bounds = (self.frame_range or {}).get("x0_std")
        if bounds is not None and std.size and any(outside(float(v), bounds) for v in (std.min(), std.max())):
            return True, UNLIKE_NORMAL
        if self.min_region_area is not None and largest_region(mask) >= self.min_region_area:
            return True, "region"
        if not score <= self.score_threshold:
            return True, "score"
        return False, ""
