"""The Python API for vision stacks: ``Inspector``.

    from eproj.runtime import Inspector
    inspector = Inspector.from_bundle("bundles/brick-l2ae")      # backend="auto"
    results = inspector(frame)                                    # a BGR/gray uint8 frame, or a batch
    results[0].mask, results[0].score, results[0].defect

Each call preprocesses the frames as the bundle says, projects them (or, with
``method="reconstruction"``, reconstructs them) on the chosen backend with the
fused kernels, and returns one ``InspectionResult`` per frame.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eproj.config import ProjectionConfig, choice, integer
from eproj.decision import Decision, tile_scores
from eproj.errors import ConfigError
from eproj.runtime.backends import create_backend
from eproj.runtime.backends.base import Backend
from eproj.bundle import BundleError
from eproj.runtime.bundle import FITS, Bundle
from eproj.runtime.frames import (CHANNEL_ORDERS, at_frame_size, check_tiling, recorded_scale, stitch, to_batch,
                                  to_frame, to_output_order)
from eproj.runtime.projector import BatchOutput, ParallelProjector, Projector, concatenate

METHODS = ("projection", "reconstruction", "ensemble")
# the score of a frame that failed (``InspectionResult.failed``): float32's largest value, finite so
# that JSON stays valid, and above every threshold so that whoever compares scores flags the frame
FAILED_SCORE = float(np.finfo(np.float32).max)

log = logging.getLogger("eproj.runtime")


@dataclass
class InspectionResult:
    """One frame's verdict.

    - ``anomaly_map``: (H, W) float32, DSSIM(frame, projection) at the frame's size;
    - ``mask``: (H, W) bool, anomaly_map above the bundle's pixel threshold;
    - ``score``: the bundle's calibrated image score (``eproj.decision``: e.g. the max of
      (x0 - f(x0))^2 or of the map, at model resolution, the max over the frame's tiles), or
      ``FAILED_SCORE`` for a failed frame;
    - ``defect``: the frame failed, or lies outside the normal frame range (reason "unlike
      any normal frame"), or its mask has a region of at least the calibrated area, or the
      score is above the bundle's image threshold; a bundle without a ``decision`` keeps
      the plain rule, score above the threshold;
    - ``projection``: (H, W, C) float32 in [0, 1], in the frames' channel order
      (the reconstruction for ``method="reconstruction"``);
    - ``iterations``: projection steps taken (the most over the frame's tiles);
      ``stop_reasons``: per tile, "threshold", "converged", "max_iters" or "gate" (finished
      by the zero-iteration gate: with 1 iteration where it keeps the first update, else with
      none, its map its reconstruction's, scaled);
    - ``timings``: milliseconds of the batch the frame was in, by stage;
    - ``failed``: the frame could not be inspected in a way eproj can vouch for (e.g. a
      non-finite value in its map, projection or score); such a frame is always ``defect``
      (fail closed), its score is ``FAILED_SCORE`` and its mask flags every pixel whose
      map value is not finite;
    - ``reason``: why the verdict is not the plain one of the map and score (empty for
      a plain verdict), e.g. "unlike any normal frame" or what made the frame fail.
    """

    anomaly_map: np.ndarray
    mask: np.ndarray
    score: float
    defect: bool
    projection: np.ndarray
    iterations: int
    stop_reasons: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    tile_iterations: list[int] = field(default_factory=list)  # per tile, in stop_reasons' order
    failed: bool = False
    reason: str = ""


def check_options(*, method: Any = "projection", fit: Any = None, channel_order: Any = "bgr",
                  batch_size: Any = 16, check_every: Any = None, threads: Any = None, loops: Any = None,
                  cuda_graphs: Any = None) -> None:
    """ConfigError, naming the option, what it must be and what came, for a bad Inspector option.

    ``method`` in METHODS; ``fit`` None or in FITS; ``channel_order`` "bgr" or "rgb"; ``batch_size``
    an integer >= 1; ``check_every`` None or an integer >= 1; ``threads`` None or an integer >= 0;
    ``loops`` None or an integer >= 1; ``cuda_graphs`` None or a bool. (Integers: not bools, not floats.)
    """
    choice("method", method, METHODS)
    if fit is not None:
        choice("fit", fit, FITS)
    choice("channel_order", channel_order, CHANNEL_ORDERS)
    for name, value, least in (("batch_size", batch_size, 1), ("check_every", check_every, 1),
                               ("threads", threads, 0), ("loops", loops, 1)):
        if value is None and name != "batch_size":
            continue
        if integer(name, value) < least:
            raise ConfigError(f"{name} must be >= {least}, got {value}")
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        raise ConfigError(f"cuda_graphs must be True, False or None, got {cuda_graphs!r}")


def batch_spans(total: int, batch_size: int) -> list[tuple[int, int]]:
    """The (start, stop) of each batch: the fewest batches of at most ``batch_size`` tiles, their
    sizes differing by at most one. A frame of 49 tiles at batch size 16 runs as 12, 12, 12, 13
    rather than 16, 16, 16 and 1, whose last batch of one tile would run on one loop while the
    other waits."""
    if total < 1 or batch_size < 1:
        raise ValueError(f"batch_spans needs total >= 1 and batch_size >= 1, got {total}, {batch_size}")
    count = -(-total // batch_size)
    bounds = [total * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class Inspector:
    """Projection-and-segmentation of frames with one bundle on one backend.

    Calls are serialised by a lock: one Inspector may be shared by threads, but
    they take turns (the device buffers are reused). For parallel inspection,
    give each thread its own Inspector.

    ``close()`` (or leaving a ``with Inspector.from_bundle(...) as inspector:`` block)
    stops the loops' threads and releases the backend's sessions, device memory and
    streams; a closed Inspector refuses further calls.
    """

    def __init__(self, bundle: Bundle, backend: Backend, config: ProjectionConfig, method: str = "projection",
                 fit: str | None = None, channel_order: str = "bgr", batch_size: int = 16,
                 check_every: int | None = None, backend_note: str = "", threads: int = 0,
                 scale: float | None = None, tile_stride: int | None = None, gate_lr: float | None = None,
                 compact: bool = True, stop_rule: str | None = None, gate_rec_error: float | None = None,
                 gate_first_update: bool | None = None):
        if not isinstance(config, ProjectionConfig):
            raise ConfigError(f"config must be a ProjectionConfig, got {type(config).__name__}")
        check_options(method=method, fit=fit, channel_order=channel_order, batch_size=batch_size,
                      check_every=check_every)
        fit = fit or bundle.fit
        if fit not in FITS:
            raise ConfigError(f"fit must be one of {FITS}, got {fit!r}")
        self.bundle, self.backend, self.config, self.method = bundle, backend, config, method
        self.fit, self.channel_order, self.batch_size, self.check_every = fit, channel_order, batch_size, check_every
        # fit "tile": frames are resized by ``scale`` (default the bundle's working scale) and cut every
        # ``tile_stride`` pixels (default half a tile); see eproj.runtime.frames
        self.scale, self.tile_stride = check_tiling(
            bundle.size, recorded_scale(bundle.manifest["input"]) if scale is None else scale, tile_stride)
        self.backend_note = backend_note or backend.describe()
        self.pixel_threshold = bundle.threshold(method, "dssim")
        self.score_threshold = bundle.threshold(method, "score")
        # the calibrated verdict (eproj.decision) of the projection under its stop rule, whose maps
        # the thresholds were set on; the other methods keep the plain one (max of the map)
        stored = None
        if method == "projection":
            rule = stop_rule_settings(bundle.manifest, stop_rule)
            stored = rule.get("decision", bundle.manifest.get("decision"))
            if "segmentation" in rule:
                self.pixel_threshold = float(rule["segmentation"]["dssim"])
                self.score_threshold = float(rule["segmentation"]["score"])
        try:
            self.decision = Decision.from_dict(stored, self.score_threshold)
            # the zero-iteration gate: the decision's (with its reconstruction-error bound and its
            # choice of the first update), or the one given
            self.gate_lr = self.decision.gate_lr if gate_lr is None else float(gate_lr)
            self.gate_rec_error = (self.decision.gate_rec_error if gate_lr is None
                                   else None if gate_rec_error is None else float(gate_rec_error))
            self.gate_first_update = (self.decision.gate_first_update if gate_first_update is None
                                      else bool(gate_first_update))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{bundle.folder}: manifest field decision (or gate_lr) is not valid: {exc!r}") from None
        if self.gate_lr is not None and self.gate_lr != self.gate_lr:
            raise ConfigError("gate_lr must be a number or -inf (no gate), got NaN")
        if self.gate_rec_error is not None and not self.gate_rec_error >= 0:
            raise ConfigError(f"gate_rec_error must be a number >= 0 or None (no bound), got {self.gate_rec_error}")
        self.compact = bool(compact)
        self._projectors: dict[int, Projector | ParallelProjector] = {}
        self.last_batch: BatchOutput | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._ingredients = None
        if method == "ensemble":  # the predictors' ingredients come from the step graph on x0 (CPU)
            from eproj.runtime.predictors import StepIngredients

            self._ingredients = StepIngredients(bundle.folder, threads=threads)
            self._ensemble = bundle.ensemble

    def close(self) -> None:
        """Stop the loops' threads and release the backend. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for projector in self._projectors.values():
                projector.close()
            self._projectors.clear()
            if self._ingredients is not None:
                self._ingredients.close()
            self.backend.close()

    def __enter__(self) -> "Inspector":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @classmethod
    def from_bundle(cls, path: str | Path, backend: str = "auto", *, device: str | None = None,
                    method: str = "projection", fit: str | None = None, channel_order: str = "bgr",
                    batch_size: int = 16, check_every: int | None = None, threads: int | None = None,
                    precision: str | None = None, cuda_graphs: bool | None = None, loops: int | None = None,
                    scale: float | None = None, tile_stride: int | None = None,
                    stop_rule: str | None = None, gate_lr: float | None = None, compact: bool = True,
                    gate_rec_error: float | None = None, gate_first_update: bool | None = None,
                    **overrides: Any) -> "Inspector":
        """Load a bundle (``eproj export``) and pick a backend.

        Args:
            backend: "auto" (TensorRT, then torch on CUDA, then ONNX Runtime on the
                CPU, then OpenVINO), "onnxruntime", "torch", "tensorrt" or "openvino"
                (CPU only, ``pip install openvino onnx``); ``device`` "cpu" or "cuda".
            method: "projection", "reconstruction" for the baseline, or "ensemble" (the
                bundle's fitted predictor ensemble; its map is a probability).
            fit: "none", "resize" or "tile"; default the bundle's.
            scale, tile_stride: fit "tile": the factor frames are resized by before tiling
                (default the bundle's working scale, 1.0 for bundles that do not record it)
                and the tiles' stride in pixels at that scale (default half a tile).
            channel_order: of colour frames, "bgr" (OpenCV) or "rgb".
            batch_size: the most tiles per batch through the loop; a call's tiles are spread
                evenly over the fewest batches (``batch_spans``).
            check_every: iterations between reads of the stop flags (1 on the CPU, 8 on GPUs).
            threads: CPU threads (0: every core this process may use). With ONNX Runtime
                on the CPU or OpenVINO, a batch of two or more tiles is split across that
                many loops run side by side, one thread each; a single tile uses all of them.
            loops: ONNX Runtime on the CPU and OpenVINO: loops side by side (default ``threads``);
                1 runs each batch as one loop whose graph uses every thread.
            precision: "fp32" or "fp16" (ONNX Runtime's step_fp16 graph, TensorRT's fp16 engine).
            cuda_graphs: torch and TensorRT: replay each iteration as a CUDA graph (default on).

            ``threads``, ``precision``, ``cuda_graphs`` and ``loops`` left at None are not
            given; one that the chosen backend does not take is a ConfigError, never
            dropped ("auto" passes over the backends that do not take it).
            stop_rule: one of the bundle's ``stop_rules`` (e.g. "validation", "training-min"):
                its stop threshold, iteration cap and zero-iteration gate; default the
                bundle's ``stop_rule``. ``stop_threshold`` and ``max_iters`` overrides win.
            gate_lr: the zero-iteration gate on Lr(x0) instead of the rule's (-inf: none); the
                rule's comes with its ``gate_rec_error`` and ``gate_first_update``, a gate given
                here with none and True unless they are given too.
            gate_rec_error: with the gate, a tile passes it only if the largest pixel of its
                reconstruction error (x0 - f(x0))^2 is at most this too; default the rule's.
            gate_first_update: whether a gated tile keeps the first update (1 iteration, the
                step at x0 on every tile) or takes no step (0 iterations: a forward pass, and
                the step on the other tiles only); default the rule's (True where it has none).
            compact: finished tiles leave the batch the step graph runs on (same results).
            **overrides: projection parameters (alpha, lam, step, weighting, max_iters,
                energy_tol, stop_threshold, adam_beta1, ...), default the bundle's.
        """
        check_options(method=method, fit=fit, channel_order=channel_order, batch_size=batch_size,
                      check_every=check_every, threads=threads, loops=loops, cuda_graphs=cuda_graphs)
        bundle = Bundle.load(path)
        rule = stop_rule_settings(bundle.manifest, stop_rule)
        for name in ("stop_threshold", "max_iters"):
            if rule.get(name) is not None and overrides.get(name) is None:
                overrides[name] = rule[name]
        rec_error, first_update = None, True
        if gate_lr is None:
            gate_lr = rule.get("gate_lr")
            rec_error, first_update = rule.get("gate_rec_error"), bool(rule.get("gate_first_update", True))
        gate_lr = float("-inf") if gate_lr is None else gate_lr
        if gate_rec_error is not None:
            rec_error = gate_rec_error
        if gate_first_update is not None:
            first_update = bool(gate_first_update)
        config = bundle.projection_config(**overrides)
        chosen, note = create_backend(bundle, backend, device, threads=threads, precision=precision,
                                      cuda_graphs=cuda_graphs, loops=loops)
        log.info("eproj runtime: %s", note)
        return cls(bundle, chosen, config, method, fit, channel_order, batch_size, check_every, note, threads or 0,
                   scale, tile_stride, gate_lr, compact, stop_rule, rec_error, first_update)

    def _projector(self, n: int) -> Projector | ParallelProjector:
        if n not in self._projectors:
            loop = "projection" if self.method == "ensemble" else self.method
            gate = None if self.gate_lr is None or self.gate_lr == float("-inf") else self.gate_lr
            args = (n, self.bundle.channels, self.bundle.size, self.config, self.pixel_threshold, loop,
                    self.check_every, gate, self.decision.zero_iteration_map_scale, self.compact,
                    self.decision.map_scale, self.gate_rec_error, self.gate_first_update)
            workers = min(self.backend.workers, n)
            self._projectors[n] = (ParallelProjector(self.backend.serial(), *args, workers=workers) if workers > 1
                                   else Projector(self.backend, *args))
        return self._projectors[n]

    def __call__(self, frames: Any, known_mask: Any = None) -> list[InspectionResult]:
        """Inspect one frame or a batch (H x W, H x W x C, N x H x W x C, or a list).

        ``known_mask``: with ``weighting="mask"``, one (H, W) mask per frame, 1 where
        pixels may change.
        """
        with self._lock:
            if self._closed:
                raise ConfigError("this Inspector is closed; load the bundle again (Inspector.from_bundle)")
            start = time.perf_counter()
            x0, layouts, mask = to_batch(frames, self.bundle.size, self.bundle.channels, self.fit,
                                         self.channel_order, known_mask, self.scale, self.tile_stride)
            if (mask is None) != (self.config.weighting != "mask"):
                raise ConfigError("a known_mask is needed exactly when weighting='mask' "
                                  f"(weighting={self.config.weighting!r})")
            prepared = time.perf_counter()
            parts = [self._projector(b - a).run(x0[a:b], None if mask is None else mask[a:b])
                     for a, b in batch_spans(len(x0), self.batch_size)]
            out = concatenate(parts)
            if self.method == "ensemble":
                self._apply_ensemble(x0, out)
            self.last_batch = out  # the tiles' arrays of this call (Lr(x0), rec_error, ...), for evaluation
            looped = time.perf_counter()
            results = self._results(out, layouts)
            timings = {"preprocess": 1e3 * (prepared - start),
                       "iterations": sum(p.timings["iterations"] for p in parts),
                       "dssim": sum(p.timings["dssim"] for p in parts),
                       "postprocess": 1e3 * (time.perf_counter() - looped)
                       + sum(p.timings["download"] for p in parts)}
            timings["total"] = 1e3 * (time.perf_counter() - start)
            for r in results:
                r.timings = dict(timings)
            return results

    def _apply_ensemble(self, x0: np.ndarray, out: BatchOutput) -> None:
        """Replace the DSSIM map by the ensemble's probability map over the predictors."""
        from eproj.predictors import ensemble_map, predictor_maps

        assert self._ingredients is not None and self._ensemble is not None
        ingredients = self._ingredients(x0)
        ingredients.projection = out.target
        model = self._ensemble["model"]
        maps = predictor_maps(ingredients, tuple(model["features"]))
        out.dssim = ensemble_map(maps, model)
        out.mask = out.dssim > self.pixel_threshold
        out.tile_max = out.dssim.reshape(len(out.dssim), -1).max(axis=1)

    def _results(self, out: BatchOutput, layouts: list) -> list[InspectionResult]:
        channels = self.bundle.channels
        targets = out.target.transpose(0, 2, 3, 1)
        results = []
        for layout in layouts:
            rows = slice(layout.start, layout.start + layout.count)
            projection = to_output_order(to_frame(targets, layout, self.fit), channels, self.channel_order)
            scores = tile_scores(out.dssim[rows], out.rec_error[rows], out.lr0[rows], self.pixel_threshold)
            score = float(scores[self.decision.image_score].max())
            if self.fit == "tile":  # overlapping tiles: blend the maps, then score and threshold the blend
                working = stitch(out.dssim, layout)
                if self.decision.image_score == "dssim_max":
                    score = float(working.max())
                anomaly_map = at_frame_size(working, layout)
                mask = anomaly_map > self.pixel_threshold
                regions = working > self.pixel_threshold  # at the model's working scale
            else:
                anomaly_map = to_frame(out.dssim, layout, self.fit)
                mask = to_frame(out.mask.astype(np.uint8), layout, self.fit, nearest=True).astype(bool)
                regions = out.mask[rows]
            defect, reason = self._verdict(score, regions, out.lr0[rows], out.dssim[rows], out.x0_std[rows])
            result = InspectionResult(
                anomaly_map=anomaly_map, mask=mask, score=score, defect=defect, reason=reason,
                projection=projection, iterations=int(out.iterations[rows].max()),
                stop_reasons=list(out.stop_reason[rows]), tile_iterations=out.iterations[rows].tolist())
            failure = non_finite_reason(out.dssim[rows], out.target[rows], score)
            if failure:
                fail(result, failure)
            results.append(result)
        return results

    def _verdict(self, score: float, regions: np.ndarray, lr0: np.ndarray, dssim: np.ndarray,
                 x0_std: np.ndarray) -> tuple[bool, str]:
        """The calibrated verdict of one frame (``eproj.decision.Decision.verdict``): outside the
        normal frame range, a mask region of the calibrated area, or a score over the threshold.
        ``regions``: the frame's mask at model resolution, (H, W) or one (S, S) per tile."""
        statistics = self.decision.frame_statistics(lr0, dssim, x0_std)
        masks = regions[None] if regions.ndim == 2 else regions
        verdicts = [self.decision.verdict(score, m, statistics) for m in masks]
        flagged = [v for v in verdicts if v[0]]
        return flagged[0] if flagged else verdicts[0]


def stop_rule_settings(manifest: dict[str, Any], rule: str | None) -> dict[str, Any]:
    """The settings of stop rule ``rule`` (default the manifest's ``stop_rule``): ``stop_threshold``,
    ``max_iters``, ``gate_lr`` (and ``gate_rec_error``, ``gate_first_update`` where calibrated);
    {} for a bundle exported before stop rules were recorded."""
    rules = manifest.get("stop_rules") or {}
    name = rule or manifest.get("stop_rule")
    if name is None:
        return {}
    if name not in rules:
        raise ConfigError(f"stop_rule must be one of {sorted(rules)} (this bundle's), got {name!r}")
    return dict(rules[name])


def non_finite_reason(anomaly_map: np.ndarray, target: np.ndarray, score: float) -> str:
    """What was not finite among one frame's map rows (T, S, S), target rows (T, C, S, S) and
    score, as a reason for ``InspectionResult``; "" when everything is finite."""
    parts = []
    for name, values in (("anomaly map", anomaly_map), ("projection", target)):
        finite = np.isfinite(values)
        if not finite.all():
            parts.append(f"{name} has {int(finite.size - finite.sum())} NaN/Inf values of {finite.size}")
    if not np.isfinite(score):
        parts.append(f"score is {score}")
    if not parts:
        return ""
    return ("non-finite result: " + "; ".join(parts) +
            " (the model, the bundle's numbers or the projection parameters give NaN/Inf on this frame)")


def fail(result: InspectionResult, reason: str) -> None:
    """Mark ``result`` failed (fail closed): defective, ``FAILED_SCORE``, ``reason`` recorded, and every
    pixel whose map value is not finite flagged in the mask."""
    result.failed = True
    result.defect = True
    result.score = FAILED_SCORE
    result.reason = f"{result.reason}; {reason}" if result.reason else reason
    result.mask = result.mask | ~np.isfinite(result.anomaly_map)
