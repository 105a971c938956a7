"""PIAD at run time: score, maps and the calibrated verdict from a PIAD bundle, without torch.

A PIAD bundle (``eproj export`` on a PIAD model.pt, ``eproj.export.piad_onnx``) holds two ONNX
graphs and a manifest:

- ``reconstruct.onnx``: x (N, C, S, S) in [0, 1] -> G(E(x)) (N, C, S, S), about [0, 1];
- ``score.onnx``: x, y (N, C, S, S) -> ``score`` (N,) the relative-perceptual-L1 distance
  L(x, y) = ||f~(x) - f~(y)||_1 / ||f~(x)||_1 (Eq. 4, the feature mean and std folded in) and
  ``feature_map`` (N, S, S) = |f~(x) - f~(y)| summed over channels, bilinearly upsampled;

so A(x) = score(x, reconstruct(x)) (Eq. 1). The DSSIM map of x against its reconstruction is
``eproj.cpp_ext.dssim_map``. ``PIADDecision`` is the verdict a PIAD calibration stores
(``eproj.train.piad_calibrate``); the reference evaluation uses it as well.

NumPy and OpenCV only; ONNX Runtime is loaded when a ``PIADInspector`` is made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eproj.decision import UNLIKE_NORMAL, largest_region, outside, tile_std
from eproj.errors import BundleError, ConfigError

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


@dataclass
class PIADResult:
    """One frame: ``score`` A(x) (the max over tiles), ``maps`` name -> (H, W) float32,
    ``reconstruction`` (H, W, C) float32, ``mask`` (H, W) bool (the decision map over its
    threshold), ``defect`` and ``reason`` (``PIADDecision.verdict``)."""

    score: float
    maps: dict[str, np.ndarray]
    reconstruction: np.ndarray
    mask: np.ndarray
    defect: bool
    reason: str


class PIADInspector:
    """Score frames with a PIAD bundle on ONNX Runtime (CPU).

    A frame (H, W, C) float32 in [0, 1], at least the model size on each side, is cut into
    tiles of that size side by side (``eproj.tiles``; a frame of the model size is one tile), each tile is reconstructed,
    scored and mapped, and the maps are stitched back. ``threads``: ONNX Runtime's intra-op
    threads (0: its default)."""

    def __init__(self, bundle: str | Path, threads: int = 0) -> None:
        self.folder = Path(bundle)
        manifest_path = self.folder / "manifest.json"
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(f"{manifest_path}: cannot read the PIAD manifest ({exc})") from None
        if self.manifest.get("format") != PIAD_BUNDLE_FORMAT:
            raise BundleError(f"{manifest_path} is not a PIAD bundle (format {self.manifest.get('format')!r}, "
                              f"expected {PIAD_BUNDLE_FORMAT!r})")
        self.size, self.channels = int(self.manifest["size"]), int(self.manifest["channels"])
        self.decision = PIADDecision.from_dict(self.manifest["decision"])
        self.thresholds = {k: float(v) for k, v in self.manifest["segmentation"].items()}
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("PIAD bundles run on ONNX Runtime, which is not installed: "
                              "pip install onnxruntime") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {name: ort.InferenceSession(str(self.folder / self.manifest["graphs"][name]), options,
                                                    providers=["CPUExecutionProvider"])
                         for name in ("reconstruct", "score")}

    def tiles(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Tiles (T, C, S, S) float32 in [0, 1] -> ``reconstruction`` (T, C, S, S), ``score`` (T,),
        ``feature`` and ``dssim`` (T, S, S)."""
        from eproj import cpp_ext

        want = (self.channels, self.size, self.size)
        if x.ndim != 4 or x.shape[1:] != want or x.dtype != np.float32:
            raise ConfigError(f"PIAD tiles must be (T, {want[0]}, {want[1]}, {want[2]}) float32, got "
                              f"{x.shape} {x.dtype}")
        x = np.ascontiguousarray(x)
        y, = self.sessions["reconstruct"].run(None, {"x": x})
        score, feature = self.sessions["score"].run(None, {"x": x, "y": y})
        dssim = cpp_ext.dssim_map(x, np.ascontiguousarray(y, np.float32)).map
        return {"reconstruction": y, "score": score, "feature": feature, "dssim": np.asarray(dssim)}

    def __call__(self, frame: np.ndarray) -> PIADResult:
        from eproj.tiles import tile, untile

        frame = np.asarray(frame, np.float32)
        if frame.ndim == 2:
            frame = frame[:, :, None]
        if frame.ndim != 3 or frame.shape[2] != self.channels:
            raise ConfigError(f"a frame must be (H, W, {self.channels}), got {frame.shape}")
        h, w = frame.shape[:2]
        if h < self.size or w < self.size:
            raise ConfigError(f"a frame must be at least the model size {self.size} on each side, got {h} x {w}")
        parts = np.ascontiguousarray(np.stack(tile(frame, self.size)).transpose(0, 3, 1, 2))
        out = self.tiles(parts)
        maps = {name: untile(out[name], (h, w)) for name in PIAD_MAPS}
        reconstruction = untile(out["reconstruction"].transpose(0, 2, 3, 1), (h, w))
        mask = maps[self.decision.map] > self.decision.pixel_threshold
        score = float(np.max(out["score"]))
        defect, reason = self.decision.verdict(score, mask, tile_std(parts))
        return PIADResult(score, maps, reconstruction, mask, defect, reason)
