"""Anomaly maps of a trained model and their evaluation on a test set.

Two methods produce the image a test image is compared with:

- ``reconstruction``: the plain baseline, f(x0);
- ``projection``: the energy projection of x0 (``eproj.train.projection``).

Either runs on the reference (PyTorch, autograd) or, given an
``eproj.runtime.Inspector`` of the same model, on the runtime (a bundle's
step graph and the fused kernels), which is what the demo uses.

Both give two anomaly maps: DSSIM(x0, target) (the method's map) and the
squared residual. Test images larger than the model input (textures) are cut
into tiles of the model size and the maps stitched back.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from eproj.errors import ConfigError, DataError
from eproj.files import write_atomic
from eproj.train.checkpoint import TrainedModel, load_model
from eproj.train.data import TestSample, load_source, tile, to_batch, untile
from eproj.train.losses import dssim_map, l2_map
from eproj.train.metrics import all_metrics
from eproj.train.models import Autoencoder
from eproj.train.projection import ProjectionConfig, project

METHODS = ("reconstruction", "projection")
MAP_KINDS = ("dssim", "l2")


def image_score(maps: np.ndarray) -> np.ndarray:
    """The image score: the maximum of each anomaly map, (N, H, W) or (H, W) -> (N,) or ()."""
    return np.asarray(maps).max(axis=(-2, -1))


def projection_config(trained: TrainedModel, **overrides: Any) -> ProjectionConfig:
    """The model's stored projection defaults with its stop threshold, then ``overrides``."""
    values = dict(trained.calibration.get("projection", {}))
    values["stop_threshold"] = trained.stop_threshold
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ProjectionConfig(**values)


@dataclass
class MethodOutput:
    """Per image of a batch: ``target`` (N, C, S, S) the image compared with x0;
    ``maps`` kind -> (N, S, S); ``iterations`` (N,) int; ``stop_reason`` (N,) str."""

    target: np.ndarray
    maps: dict[str, np.ndarray]
    iterations: np.ndarray
    stop_reason: list[str]


def run_method(model: Autoencoder, images: np.ndarray, method: str,
               config: ProjectionConfig | None = None, batch: int = 32,
               progress: bool = False, desc: str = "", inspector: Any = None) -> MethodOutput:
    """Apply a method to (N, C, S, S) float32 images in [0, 1], ``batch`` images at a time,
    on the reference or, with ``inspector`` (an eproj.runtime.Inspector), on the runtime."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if inspector is not None:
        return _run_inspector(inspector, images, method, batch, progress, desc)
    if method == "projection" and config is None:
        raise ConfigError("the projection method needs a ProjectionConfig")
    targets, dssim, l2, iterations, reasons = [], [], [], [], []
    chunks = range(0, len(images), batch)
    for start in tqdm(chunks, desc=desc or method, unit="batch", disable=not progress, leave=False):
        x0 = torch.from_numpy(np.ascontiguousarray(images[start:start + batch]))
        if method == "projection":
            result = project(model, x0, config)
            target, its = result.projection, result.iterations.numpy()
            reasons += result.stop_reason
        else:
            with torch.no_grad():
                target = model(x0)
            its = np.zeros(len(x0), np.int64)
            reasons += ["none"] * len(x0)
        with torch.no_grad():
            dssim.append(dssim_map(x0, target).numpy())
            l2.append(l2_map(x0, target).numpy())
        targets.append(target.detach().numpy())
        iterations.append(its)
    return MethodOutput(np.concatenate(targets), {"dssim": np.concatenate(dssim), "l2": np.concatenate(l2)},
                        np.concatenate(iterations), reasons)


def _run_inspector(inspector: Any, images: np.ndarray, method: str, batch: int, progress: bool,
                   desc: str) -> MethodOutput:
    if inspector.method != method:
        raise ConfigError(f"the inspector runs {inspector.method}, not {method}")
    targets, dssim, iterations, reasons = [], [], [], []
    chunks = range(0, len(images), batch)
    for start in tqdm(chunks, desc=desc or method, unit="batch", disable=not progress, leave=False):
        part = images[start:start + batch]
        results = inspector([image.transpose(1, 2, 0) for image in part])
        targets.append(np.stack([r.projection.transpose(2, 0, 1) for r in results]))
        dssim.append(np.stack([r.anomaly_map for r in results]))
        iterations.append(np.array([r.iterations for r in results], np.int64))
        reasons += [r.stop_reasons[0] for r in results]
    target = np.concatenate(targets)
    l2 = ((images - target) ** 2).mean(axis=1)
    return MethodOutput(target, {"dssim": np.concatenate(dssim), "l2": l2}, np.concatenate(iterations), reasons)


@dataclass
class SampleResult:
    """One test image after a method: maps kind -> (H, W); target (H, W, C); score = max DSSIM;
    iterations and stop reasons of its tiles."""

    sample: TestSample
    maps: dict[str, np.ndarray]
    target: np.ndarray
    iterations: float
    score: float
    stop_reasons: list[str]


def run_on_samples(trained: TrainedModel, samples: list[TestSample], method: str,
                   config: ProjectionConfig | None, progress: bool = True,
                   inspector: Any = None) -> list[SampleResult]:
    """Apply a method to test images of any size that tiles by the model size."""
    size, channels = trained.config.size, trained.config.channels
    tiles, owners = [], []
    for i, s in enumerate(samples):
        if s.image.ndim != 3 or s.image.shape[2] != channels:
            raise DataError(f"test image {s.name} has shape {s.image.shape}; the model expects "
                            f"{channels} channel(s)")
        parts = tile(s.image, size)
        tiles += parts
        owners += [i] * len(parts)
    out = run_method(trained.model, to_batch(tiles), method, config, progress=progress,
                     desc=f"{method} {trained.config.family}", inspector=inspector)
    owners_arr = np.asarray(owners)
    results = []
    for i, s in enumerate(samples):
        idx = np.nonzero(owners_arr == i)[0]
        shape = s.image.shape[:2]
        maps = {k: untile(v[idx], shape) for k, v in out.maps.items()}
        target = untile(out.target[idx].transpose(0, 2, 3, 1), shape)
        results.append(SampleResult(s, maps, target, float(out.iterations[idx].mean()),
                                    float(image_score(maps["dssim"])), [out.stop_reason[j] for j in idx]))
    return results


def summarise(trained: TrainedModel, results: list[SampleResult], method: str) -> dict[str, Any]:
    """Metrics of every map kind, iteration statistics and per-image rows."""
    masks = [r.sample.mask for r in results]
    labels = np.array([r.sample.label for r in results])
    metrics = {}
    for kind in MAP_KINDS:
        maps = [r.maps[kind] for r in results]
        scores = np.array([image_score(m) for m in maps])
        metrics[kind] = all_metrics(maps, masks, scores, labels, trained.segmentation_threshold(method, kind))
    its = np.array([r.iterations for r in results])
    counts, edges = np.histogram(its, bins=10)
    reasons = [reason for r in results for reason in r.stop_reasons]
    return {
        "metrics": metrics,
        "iterations": {"mean": float(its.mean()), "median": float(np.median(its)),
                       "p90": float(np.percentile(its, 90)), "min": float(its.min()), "max": float(its.max()),
                       "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
                       "stop_reasons": {k: reasons.count(k) for k in sorted(set(reasons))}},
        "images": [{"name": r.sample.name, "defect": r.sample.defect, "label": r.sample.label,
                    "score": r.score, "iterations": r.iterations,
                    "flagged": bool(r.score > trained.segmentation_threshold(method, "score"))}
                   for r in results],
    }


def save_maps(results: list[SampleResult], trained: TrainedModel, method: str, folder: Path) -> None:
    """Write each image's DSSIM map (float32 .npy) and predicted mask (.png), named after it."""
    folder.mkdir(parents=True, exist_ok=True)
    threshold = trained.segmentation_threshold(method, "dssim")
    for r in results:
        np.save(folder / f"{r.sample.name}.npy", r.maps["dssim"].astype(np.float32))
        mask = (r.maps["dssim"] > threshold).astype(np.uint8) * 255
        if not cv2.imwrite(str(folder / f"{r.sample.name}_mask.png"), mask):
            raise DataError(f"cannot write {folder / (r.sample.name + '_mask.png')}")


def write_json(payload: dict[str, Any], path: Path) -> None:
    write_atomic(path, json.dumps(payload, indent=2).encode())


def evaluate(trained: TrainedModel, data: str, method: str, progress: bool = True, inspector: Any = None,
             **overrides: Any) -> tuple[dict[str, Any], list[SampleResult]]:
    """Evaluate ``trained`` with ``method`` on the test set of ``data``.

    ``overrides`` replace the model's stored projection parameters (see ProjectionConfig).
    With ``inspector`` (an eproj.runtime.Inspector of the same model, fit "none",
    channel order "rgb"), the runtime computes the maps; its configuration rules.
    """
    source = load_source(data, size=trained.config.size)
    if source.channels != trained.config.channels:
        raise DataError(f"{data} has {source.channels}-channel images; the model expects "
                        f"{trained.config.channels}")
    samples = source.test()
    config = projection_config(trained, **overrides) if method == "projection" else None
    if inspector is not None and method == "projection":
        config = inspector.config
    start = time.perf_counter()
    results = run_on_samples(trained, samples, method, config, progress, inspector)
    seconds = time.perf_counter() - start
    report = {"model": str(trained.path), "family": trained.config.family, "data": data, "method": method,
              "engine": "reference (PyTorch autograd)" if inspector is None else f"runtime: {inspector.backend_note}",
              "projection": None if config is None else config.to_dict(),
              "seconds": seconds, "images_per_second": len(samples) / seconds}
    report.update(summarise(trained, results, method))
    return report, results


def evaluate_cli(run: str, data: str | None, method: str, json_path: str,
                 maps_dir: str | None, **overrides: Any) -> dict[str, Any]:
    trained = load_model(run)
    data = data or trained.train.get("data")
    if not data:
        raise ConfigError(f"{trained.path} does not record its training data; pass --data")
    report, results = evaluate(trained, data, method, **overrides)
    write_json(report, Path(json_path))
    if maps_dir:
        save_maps(results, trained, method, Path(maps_dir))
    return report
