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

The unet family adds Puzzle-AE's permutation scores (``eproj.train.puzzle``), whatever
the method: the ``permutation`` map (the mean over the K permutations of the
normalised squared error) and the ``puzzle`` image score (Eq. 7, normalised by the
calibration's per-permutation means on normal validation images; an image's score is
the largest of its tiles'), with the paper's image-level protocol (image AUROC, FPR
at TPR 0.99 and 0.995) in ``puzzle_protocol``, beside the plain score (identity
input: the sum of the squared residual).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from eproj.decision import IMAGE_SCORES, Decision, map_factors, rec_error_map, tile_scores, tile_std
from eproj.errors import ConfigError, DataError
from eproj.files import write_atomic
from eproj.train.checkpoint import TrainedModel, load_model
from eproj.train.data import TestSample, load_source, recorded_fit, tile, to_batch, untile
from eproj.train.losses import dssim_map, l2_map, reconstruction_loss
from eproj.train.metrics import all_metrics, image_auroc
from eproj.train.models import Autoencoder
from eproj.train.projection import ProjectionConfig, project

METHODS = ("reconstruction", "projection")
MAP_KINDS = ("dssim", "l2")
PERMUTATION_MAP = "permutation"  # the unet family's extra map kind
PROTOCOL_TPRS = (0.99, 0.995)  # Puzzle-AE's image-level protocol: FPR at these TPRs


def image_score(maps: np.ndarray) -> np.ndarray:
    """The plain image score: the maximum of each anomaly map, (N, H, W) or (H, W) -> (N,) or ().
    The projection's calibrated score is ``eproj.decision`` (``SampleResult.score``)."""
    return np.asarray(maps).max(axis=(-2, -1))


def fpr_at_image_tpr(scores: np.ndarray, labels: np.ndarray, tpr: float) -> float | None:
    """The false-positive rate of the highest image-score threshold that flags at least ``tpr`` of the
    defective images (labels 1); None without both classes. scores, labels: (N,)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return None
    positives = np.sort(scores[labels])[::-1]
    threshold = positives[int(np.ceil(tpr * len(positives))) - 1]
    return float((scores[~labels] >= threshold).mean())


def permutation_calibration_of(trained: TrainedModel) -> dict[str, Any] | None:
    """The model's permutation calibration (``eproj.train.puzzle.permutation_calibration``); None for
    the other families; a unet model calibrated before it is refused, with the command that adds it."""
    if trained.config.family != "unet":
        return None
    entry = trained.calibration.get("permutation")
    if not isinstance(entry, dict) or "normaliser" not in entry:
        raise ConfigError(f"{trained.path} has no permutation normalisers in its calibration (calibrated before "
                          f"eproj computed them); recalibrate it: eproj calibrate RUN (the run folder), or "
                          f"eproj.train.calibrate.recalibrate('{trained.path}')")
    return entry


def permutation_outputs(trained: TrainedModel, tiles: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The puzzle scores (T,) and permutation maps (T, S, S) of (T, C, S, S) tiles, float32,
    with the model's calibrated normalisers (``permutation_calibration_of``)."""
    from eproj.train.puzzle import permutation_maps

    entry = permutation_calibration_of(trained)
    assert entry is not None
    normaliser = torch.tensor(entry["normaliser"], dtype=torch.float64)
    scores, maps = [], []
    for start in range(0, len(tiles), batch):
        s, m = permutation_maps(trained.model, torch.from_numpy(np.ascontiguousarray(tiles[start:start + batch])),
                                entry["kind"], normaliser)
        scores.append(s.float().numpy())
        maps.append(m.float().numpy())
    return np.concatenate(scores), np.concatenate(maps)


def rule_settings(trained: TrainedModel, rule: str | None = None) -> dict[str, Any]:
    """Stop rule ``rule`` of the model (default its calibrated ``stop_rule``): ``stop_threshold``,
    ``max_iters`` and ``gate_lr``; a model calibrated before stop rules: its stop threshold alone."""
    rules = trained.calibration.get("stop_rules") or {}
    name = rule or trained.calibration.get("stop_rule")
    if name is None:
        return {"stop_threshold": trained.stop_threshold}
    if name not in rules:
        raise ConfigError(f"stop_rule must be one of {sorted(rules)} (this model's), got {name!r}")
    return dict(rules[name])


def projection_config(trained: TrainedModel, rule: str | None = None, **overrides: Any) -> ProjectionConfig:
    """The model's stored projection defaults with its stop rule's threshold and cap, then ``overrides``."""
    values = dict(trained.calibration.get("projection", {}))
    settings = rule_settings(trained, rule)
    values["stop_threshold"] = settings["stop_threshold"]
    if settings.get("max_iters") is not None:
        values["max_iters"] = settings["max_iters"]
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ProjectionConfig(**values)


def threshold_of(trained: TrainedModel, method: str, kind: str, rule: str | None = None) -> float:
    """The segmentation threshold of ``method``'s ``kind`` map ("dssim", "l2", "score"); the
    projection's under stop rule ``rule`` (default the model's), on whose maps it was set."""
    settings = rule_settings(trained, rule) if method == "projection" else {}
    if "segmentation" in settings:
        return float(settings["segmentation"][kind])
    return trained.segmentation_threshold(method, kind)


def decision_of(trained: TrainedModel, method: str, rule: str | None = None) -> Decision:
    """The calibrated verdict of the projection under stop rule ``rule`` (default the model's);
    the plain one (max of the map) otherwise."""
    stored = None
    if method == "projection":
        stored = rule_settings(trained, rule).get("decision", trained.calibration.get("decision"))
    return Decision.from_dict(stored, threshold_of(trained, method, "score", rule))


def projection_maps(model: Autoencoder, x0: torch.Tensor, projection: torch.Tensor, iterations: np.ndarray,
                    zero_map_scale: float = 1.0, map_scale: tuple[float, ...] | None = None,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The projection's maps as the runtime forms them.

    Args:
        x0, projection: (N, C, S, S); iterations: (N,) steps each sample took.
        zero_map_scale: the factor of DSSIM(x0, f(x0)) that is the map of a sample that
            took no step (its projection is x0; see ``eproj.decision``).
        map_scale: the factors of the DSSIM maps per step count (``eproj.decision.map_factors``);
            it replaces ``zero_map_scale`` when given.
    Returns:
        dssim (N, S, S), l2 (N, S, S), rec_error (N, S, S) = (x0 - f(x0))^2 over channels,
        lr0 (N,) = Lr(x0); float32.
    """
    with torch.no_grad():
        lr0, reconstruction = reconstruction_loss(model, x0)
        dssim = dssim_map(x0, projection).numpy()
        l2 = l2_map(x0, projection).numpy()
        still = np.nonzero(np.asarray(iterations) == 0)[0]
        if len(still):
            rows = torch.from_numpy(still)
            dssim[still] = dssim_map(x0[rows], reconstruction[rows]).numpy()
            l2[still] = l2_map(x0[rows], reconstruction[rows]).numpy()
        dssim *= map_factors(iterations, map_scale, zero_map_scale)[:, None, None]
    return dssim, l2, rec_error_map(x0.numpy(), reconstruction.numpy()), lr0.numpy()


@dataclass
class MethodOutput:
    """Per image of a batch: ``target`` (N, C, S, S) the image compared with x0;
    ``maps`` kind -> (N, S, S); ``iterations`` (N,) int; ``stop_reason`` (N,) str;
    ``rec_error`` (N, S, S) (x0 - f(x0))^2 and ``lr0`` (N,) Lr(x0)."""

    target: np.ndarray
    maps: dict[str, np.ndarray]
    iterations: np.ndarray
    stop_reason: list[str]
    rec_error: np.ndarray
    lr0: np.ndarray


def _chunks(n: int, batch: int, progress: bool, desc: str):
    """The start of each chunk of ``batch`` tiles out of ``n``, with a bar over tiles that
    says which tiles are in flight (a projected chunk can take a minute)."""
    with tqdm(total=n, desc=desc, unit="tile", disable=not progress, leave=False) as bar:
        for start in range(0, n, batch):
            bar.set_postfix_str(f"tiles {start + 1}-{min(start + batch, n)} in flight")
            yield start
            bar.update(min(batch, n - start))


def run_method(model: Autoencoder, images: np.ndarray, method: str,
               config: ProjectionConfig | None = None, batch: int = 32,
               progress: bool = False, desc: str = "", inspector: Any = None,
               gate_threshold: float | None = None, zero_map_scale: float = 1.0,
               map_scale: tuple[float, ...] | None = None, gate_rec_error: float | None = None,
               gate_first_update: bool = True) -> MethodOutput:
    """Apply a method to (N, C, S, S) float32 images in [0, 1], ``batch`` images at a time,
    on the reference or, with ``inspector`` (an eproj.runtime.Inspector), on the runtime.
    ``gate_threshold``, ``gate_rec_error``, ``gate_first_update`` and ``zero_map_scale``: the zero-iteration gate
    (``eproj.train.projection.project``) and map (``projection_maps``)."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if inspector is not None:
        return _run_inspector(inspector, images, method, batch, progress, desc)
    if method == "projection" and config is None:
        raise ConfigError("the projection method needs a ProjectionConfig")
    targets, dssim, l2, iterations, reasons, rec_error, lr0 = [], [], [], [], [], [], []
    for start in _chunks(len(images), batch, progress, desc or method):
        x0 = torch.from_numpy(np.ascontiguousarray(images[start:start + batch]))
        if method == "projection":
            result = project(model, x0, config, gate_threshold=gate_threshold, gate_rec_error=gate_rec_error,
                             gate_first_update=gate_first_update)
            target, its = result.projection, result.iterations.numpy()
            reasons += result.stop_reason
        else:
            with torch.no_grad():
                target = model(x0)
            its = np.zeros(len(x0), np.int64)
            reasons += ["none"] * len(x0)
        if method == "projection":
            maps = projection_maps(model, x0, target.detach(), its, zero_map_scale, map_scale)
        else:
            maps = projection_maps(model, x0, target.detach(), np.ones_like(its))
        dssim.append(maps[0])
        l2.append(maps[1])
        rec_error.append(maps[2])
        lr0.append(maps[3])
        targets.append(target.detach().numpy())
        iterations.append(its)
    return MethodOutput(np.concatenate(targets), {"dssim": np.concatenate(dssim), "l2": np.concatenate(l2)},
                        np.concatenate(iterations), reasons, np.concatenate(rec_error), np.concatenate(lr0))


def _run_inspector(inspector: Any, images: np.ndarray, method: str, batch: int, progress: bool,
                   desc: str) -> MethodOutput:
    if inspector.method != method:
        raise ConfigError(f"the inspector runs {inspector.method}, not {method}")
    targets, dssim, iterations, reasons, rec_error, lr0 = [], [], [], [], [], []
    for start in _chunks(len(images), batch, progress, desc or method):
        part = images[start:start + batch]
        results = inspector([image.transpose(1, 2, 0) for image in part])
        targets.append(np.stack([r.projection.transpose(2, 0, 1) for r in results]))
        dssim.append(np.stack([r.anomaly_map for r in results]))
        iterations.append(np.array([r.iterations for r in results], np.int64))
        reasons += [r.stop_reasons[0] for r in results]
        out = inspector.last_batch
        rec_error.append(out.rec_error)
        lr0.append(out.lr0)
    target = np.concatenate(targets)
    l2 = ((images - target) ** 2).mean(axis=1)
    return MethodOutput(target, {"dssim": np.concatenate(dssim), "l2": l2}, np.concatenate(iterations), reasons,
                        np.concatenate(rec_error), np.concatenate(lr0))


@dataclass
class SampleResult:
    """One test image after a method: maps kind -> (H, W); target (H, W, C); ``score`` the
    method's image score (``decision_of``) and ``scores`` every candidate of
    ``eproj.decision.IMAGE_SCORES`` (the max over the image's tiles); ``defect`` and ``reason``
    the calibrated verdict; ``iterations`` (mean) and ``tile_iterations``, stop reasons of its tiles."""

    sample: TestSample
    maps: dict[str, np.ndarray]
    target: np.ndarray
    iterations: float
    score: float
    stop_reasons: list[str]
    scores: dict[str, float] = field(default_factory=dict)
    defect: bool | None = None  # None: not judged (a result built outside run_on_samples)
    reason: str = ""
    tile_iterations: list[int] = field(default_factory=list)


def run_on_samples(trained: TrainedModel, samples: list[TestSample], method: str,
                   config: ProjectionConfig | None, progress: bool = True,
                   inspector: Any = None, gate_threshold: float | None = None,
                   rule: str | None = None, gate_rec_error: float | None = None,
                   gate_first_update: bool = True) -> list[SampleResult]:
    """Apply a method to test images of any size that tiles by the model size; the
    calibrated verdict (``decision_of``) scores and judges each."""
    decision = decision_of(trained, method, rule)
    pixel = threshold_of(trained, method, "dssim", rule)
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
                     desc=f"{method} {trained.config.family}", inspector=inspector,
                     gate_threshold=gate_threshold, zero_map_scale=decision.zero_iteration_map_scale,
                     map_scale=decision.map_scale, gate_rec_error=gate_rec_error,
                     gate_first_update=gate_first_update)
    candidates = tile_scores(out.maps["dssim"], out.rec_error, out.lr0, pixel)
    if trained.config.family == "unet":
        candidates["puzzle"], out.maps[PERMUTATION_MAP] = permutation_outputs(trained, to_batch(tiles))
        candidates["plain"] = out.rec_error.reshape(len(tiles), -1).sum(axis=1) * channels
    x0_std = tile_std(to_batch(tiles))
    owners_arr = np.asarray(owners)
    results = []
    for i, s in enumerate(samples):
        idx = np.nonzero(owners_arr == i)[0]
        shape = s.image.shape[:2]
        maps = {k: untile(v[idx], shape) for k, v in out.maps.items()}
        target = untile(out.target[idx].transpose(0, 2, 3, 1), shape)
        scores = {name: float(values[idx].max()) for name, values in candidates.items()}
        score = scores[decision.image_score]
        statistics = decision.frame_statistics(out.lr0[idx], out.maps["dssim"][idx], x0_std[idx])
        verdicts = [decision.verdict(score, out.maps["dssim"][j] > pixel, statistics) for j in idx]
        defect, reason = next((v for v in verdicts if v[0]), verdicts[0])
        results.append(SampleResult(s, maps, target, float(out.iterations[idx].mean()), score,
                                    [out.stop_reason[j] for j in idx], scores, defect, reason,
                                    [int(out.iterations[j]) for j in idx]))
    return results


def summarise(trained: TrainedModel, results: list[SampleResult], method: str,
              rule: str | None = None) -> dict[str, Any]:
    """Metrics of every map kind, iteration statistics and per-image rows."""
    masks = [r.sample.mask for r in results]
    labels = np.array([r.sample.label for r in results])
    metrics = {}
    for kind in MAP_KINDS:
        maps = [r.maps[kind] for r in results]
        scores = np.array([r.score for r in results]) if kind == "dssim" else np.array([image_score(m) for m in maps])
        metrics[kind] = all_metrics(maps, masks, scores, labels, threshold_of(trained, method, kind, rule))
    metrics["image_scores"] = {name: image_auroc(np.array([r.scores[name] for r in results]), labels)
                               for name in IMAGE_SCORES}
    permutation = permutation_calibration_of(trained)
    if permutation is not None:
        puzzle = np.array([r.scores["puzzle"] for r in results])
        metrics[PERMUTATION_MAP] = all_metrics([r.maps[PERMUTATION_MAP] for r in results], masks, puzzle, labels,
                                               permutation["map_threshold"])
        metrics["puzzle_protocol"] = {
            score: {"image_auroc": image_auroc(values, labels),
                    **{f"fpr_at_tpr_{t:g}": fpr_at_image_tpr(values, labels, t) for t in PROTOCOL_TPRS}}
            for score, values in (("puzzle", puzzle), ("plain", np.array([r.scores["plain"] for r in results])))}
        metrics["puzzle_protocol"]["note"] = (f"image score of a tiled image: its largest tile score; "
                                              f"{permutation['kind']} permutations (K = {len(permutation['orders'])})")
    its = np.array([r.iterations for r in results])
    normal_its = [t for r in results if r.sample.label == 0 for t in r.tile_iterations]
    defective_its = [t for r in results if r.sample.label == 1 for t in r.tile_iterations]
    counts, edges = np.histogram(its, bins=10)
    reasons = [reason for r in results for reason in r.stop_reasons]
    return {
        "metrics": metrics,
        "iterations": {"mean": float(its.mean()), "median": float(np.median(its)),
                       "p90": float(np.percentile(its, 90)), "min": float(its.min()), "max": float(its.max()),
                       "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
                       "stop_reasons": {k: reasons.count(k) for k in sorted(set(reasons))},
                       "mean_normal_tiles": float(np.mean(normal_its)) if normal_its else None,
                       "mean_defective_tiles": float(np.mean(defective_its)) if defective_its else None},
        "images": [{"name": r.sample.name, "defect": r.sample.defect, "label": r.sample.label,
                    "score": r.score, "iterations": r.iterations, "flagged": r.defect, "reason": r.reason}
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
             stop_rule: str | None = None, gate_threshold: float | None = None,
             **overrides: Any) -> tuple[dict[str, Any], list[SampleResult]]:
    """Evaluate ``trained`` with ``method`` on the test set of ``data``.

    ``overrides`` replace the model's stored projection parameters (see ProjectionConfig);
    ``stop_rule`` picks one of the model's stop rules (default its own) and with it the
    zero-iteration gate, which ``gate_threshold`` replaces (-inf: no gate).
    With ``inspector`` (an eproj.runtime.Inspector of the same model, fit "none",
    channel order "rgb"), the runtime computes the maps; its configuration rules.
    """
    source = load_source(data, size=trained.config.size, fit=recorded_fit(trained.train))
    if source.channels != trained.config.channels:
        raise DataError(f"{data} has {source.channels}-channel images; the model expects "
                        f"{trained.config.channels}")
    samples = source.test()
    config = projection_config(trained, stop_rule, **overrides) if method == "projection" else None
    gate, gate_rec, first_update = stop_rule_gate(trained, stop_rule, gate_threshold)
    if inspector is not None and method == "projection":
        config, gate = inspector.config, inspector.gate_lr
        gate_rec = getattr(inspector, "gate_rec_error", None)
        first_update = getattr(inspector, "gate_first_update", True)
    start = time.perf_counter()
    results = run_on_samples(trained, samples, method, config, progress, inspector, gate, stop_rule, gate_rec,
                             first_update)
    seconds = time.perf_counter() - start
    report = {"model": str(trained.path), "family": trained.config.family, "data": data, "method": method,
              "engine": "reference (PyTorch autograd)" if inspector is None else f"runtime: {inspector.backend_note}",
              "projection": None if config is None else config.to_dict(),
              "stop_rule": (stop_rule or trained.calibration.get("stop_rule")) if method == "projection" else None,
              "gate_lr": gate if method == "projection" else None,
              "gate_rec_error": gate_rec if method == "projection" and gate is not None else None,
              "gate_first_update": first_update if method == "projection" and gate is not None else None,
              "image_score": decision_of(trained, method, stop_rule).image_score,
              "seconds": seconds, "images_per_second": len(samples) / seconds}
    report.update(summarise(trained, results, method, stop_rule))
    return report, results


def stop_rule_gate(trained: TrainedModel, rule: str | None,
                   gate_threshold: float | None) -> tuple[float | None, float | None, bool]:
    """The zero-iteration gate (Lr(x0) bound, reconstruction-error bound, whether a gated tile
    keeps the first update): ``gate_threshold`` if given (-inf: none) with no reconstruction-error
    bound and the first update kept, else the stop rule's."""
    settings = rule_settings(trained, rule)
    if gate_threshold is not None:
        gate, rec, first = gate_threshold, None, True
    else:
        gate, rec = settings.get("gate_lr"), settings.get("gate_rec_error")
        first = bool(settings.get("gate_first_update", True))
    if gate is None or gate == float("-inf"):
        return None, None, True
    return float(gate), None if rec is None else float(rec), first


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
