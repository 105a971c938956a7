"""PIAD at run time: score, maps and the calibrated verdict from a PIAD bundle, without torch.

A PIAD bundle (``eproj export`` on a PIAD model.pt, ``eproj.export.piad_onnx``) holds two ONNX
graphs and a manifest:

- ``reconstruct.onnx``: x (N, C, S, S) in [0, 1] -> G(E(x)) (N, C, S, S), about [0, 1];
- ``score.onnx``: x, y (N, C, S, S) -> ``score`` (N,) the relative-perceptual-L1 distance
  L(x, y) = ||f~(x) - f~(y)||_1 / ||f~(x)||_1 (Eq. 4, the feature mean and std folded in) and
  ``feature_map`` (N, S, S) = |f~(x) - f~(y)| summed over channels, bilinearly upsampled;

so A(x) = score(x, reconstruct(x)) (Eq. 1). The DSSIM map of x against its reconstruction is
``eproj.cpp_ext.dssim_map``; the verdict is ``eproj.piad_decision.PIADDecision``, the one the
calibration stores and the reference evaluation applies. ``PIADInspector``
scores frames; ``cmd_run_piad`` is ``eproj run`` with a PIAD bundle (the projection's
``Inspector`` does not take PIAD bundles).

NumPy and OpenCV only; ONNX Runtime is loaded when a ``PIADInspector`` is made.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eproj.decision import tile_std
from eproj.errors import BundleError, ConfigError
from eproj.piad_decision import PIAD_BUNDLE_FORMAT, PIAD_MAPS, PIADDecision

@dataclass
class PIADResult:
    """One frame: ``score`` A(x) (the max over its tiles), ``maps`` name -> (H, W) float32 at the
    frame's size, ``reconstruction`` (H, W, C) float32 (model channel order), ``mask`` (H, W) bool
    (the decision map over its threshold), ``defect`` and ``reason`` (``PIADDecision.verdict``);
    ``failed``, ``iterations``, ``stop_reasons`` and ``timings`` (ms) as ``eproj run`` records them
    (PIAD takes no projection step)."""

    score: float
    maps: dict[str, np.ndarray]
    reconstruction: np.ndarray
    mask: np.ndarray
    defect: bool
    reason: str
    failed: bool = False
    iterations: int = 0
    stop_reasons: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Channels:
    channels: int


class PIADInspector:
    """Score frames with a PIAD bundle on ONNX Runtime (CPU).

    Frames as ``eproj.runtime.frames`` takes them (uint8, uint16 or float in [0, 1]; one frame or
    a list; colour in ``channel_order``) meet the model size as the model was trained (the
    manifest's ``input``: fit "tile" at the working scale, tiles side by side as evaluation and
    calibration cut them; fit "resize": resized). Each tile is reconstructed, scored and mapped;
    a frame's score is its largest tile's, its maps are stitched and brought back to its size.
    ``threads``: ONNX Runtime's intra-op threads (0: its default). Usable by ``eproj run``
    (``cmd_run_piad``): ``bundle.channels``, ``backend_note``, a context manager."""

    def __init__(self, bundle: str | Path, threads: int = 0, channel_order: str = "rgb") -> None:
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
        self.bundle = _Channels(self.channels)
        self.channel_order = channel_order
        record = self.manifest.get("input") or {}
        self.fit = record.get("fit") or "resize"
        self.scale = float(record.get("scale") or 1.0)
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
        self.backend_note = f"PIAD bundle {self.folder} on ONNX Runtime (CPU), fit {self.fit}"

    def __enter__(self) -> "PIADInspector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sessions.clear()

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

    def __call__(self, frames: Any) -> list[PIADResult]:
        from eproj.runtime.frames import stitch, to_batch, to_frame
        from eproj.runtime.inspector import FAILED_SCORE, non_finite_reason

        start = time.perf_counter()
        x, layouts, _ = to_batch(frames, self.size, self.channels, self.fit, self.channel_order,
                                 scale=self.scale, stride=self.size)
        out = self.tiles(x)
        std = tile_std(x)
        ms = 1e3 * (time.perf_counter() - start) / len(layouts)
        results = []
        for layout in layouts:
            rows = slice(layout.start, layout.start + layout.count)
            maps = {name: to_frame(out[name], layout, self.fit) for name in PIAD_MAPS}
            reconstruction = to_frame(out["reconstruction"].transpose(0, 2, 3, 1), layout, self.fit)
            score = float(np.max(out["score"][rows]))
            # the region test at model resolution (min_region_area counts model pixels), as calibrated
            decision_map = (stitch(out[self.decision.map], layout) if self.fit == "tile"
                            else out[self.decision.map][layout.start])
            defect, reason = self.decision.verdict(score, decision_map > self.decision.pixel_threshold, std[rows])
            mask = maps[self.decision.map] > self.decision.pixel_threshold
            result = PIADResult(score, maps, reconstruction, mask, defect, reason, timings={"total": ms})
            # fail closed, as the projection's inspector: a NaN/Inf map, reconstruction or score is a
            # failed, defective frame with a finite score, never a verdict read off NaN comparisons
            failure = non_finite_reason(np.stack([out[name][rows] for name in PIAD_MAPS]),
                                        out["reconstruction"][rows], score)
            if failure:
                result.failed, result.defect, result.score = True, True, FAILED_SCORE
                result.reason = f"{reason}; {failure}" if reason else failure
                result.mask = mask | ~np.isfinite(maps[self.decision.map])
            results.append(result)
        return results


# eproj run's options a PIAD bundle has no use for, with the value that means "not set"
RUN_DEFAULTS = {"backend": "auto", "device": None, "precision": None, "method": "projection", "fit": None,
                "max_iters": None, "alpha": None, "lam": None, "step": None, "weighting": None,
                "energy_tol": None, "stop_threshold": None, "stop_rule": None, "scale": None, "tile_stride": None}


def cmd_run_piad(args: Any) -> int:
    """``eproj run`` with a PIAD bundle: every frame of ``--source`` through a ``PIADInspector``,
    written as ``eproj.runtime.cli.run_stream`` writes (masks/, overlays/, results.jsonl)."""
    from eproj.runtime.cli import cmd_run

    unused = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name, default in RUN_DEFAULTS.items()
              if getattr(args, name, default) not in (default, None)]
    if unused:
        raise ConfigError(f"{', '.join(unused)} do not apply to a PIAD bundle (ONNX Runtime on the CPU, "
                          f"the fit it was trained with, no projection); drop them")
    return cmd_run(args, lambda a: PIADInspector(a.bundle, threads=a.threads or 0, channel_order="bgr"))


def is_piad_bundle(folder: str | Path) -> bool:
    """Whether ``folder`` holds a PIAD bundle's manifest."""
    try:
        return json.loads((Path(folder) / "manifest.json").read_text()).get("format") == PIAD_BUNDLE_FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
