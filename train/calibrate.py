"""Calibration: what a trained model carries besides its weights.

Everything here is chosen on held-out validation data, never on test images:

- Lr statistics on training inputs (min, quantiles, mean);
- the stop rules (``calibration["stop_rules"]``) and the one in force
  (``stop_rule``, whose threshold is ``stop_threshold``):

  * ``training-min``: stop when Lr falls under the training-set minimum, at most
    100 iterations (the paper's rule; unseen normal images rarely reach it);
  * ``validation``: optionally the zero-iteration gate at the largest Lr(x0) (and
    optionally the largest reconstruction-error pixel) of the normal validation images:
    a tile already as well explained as they are keeps the first update and takes no
    further step, or (``gate_first_update`` False) takes no step at all and is judged
    by its reconstruction's map, one forward pass; a stop threshold
    at the Lr that normal validation images reach after k iterations (or the training
    minimum), and an iteration cap; k, the cap and the gate (one of those or none) are chosen among
    ``RULE_GRID`` as the cheapest setting whose pixel AUROC and AUPRO on validation
    images with synthetic defects stay within ``QUALITY_SLACK`` of the 100-iteration
    projection (``FULL_RULE``: no stop, no gate), with at most ``NORMAL_ITERATIONS`` on
    normal images (else the best quality among those);

- segmentation thresholds per method and map kind: a quantile (0.99 by default)
  of the anomaly-map values on normal validation images;
- the decision (``eproj.decision``): the zero-iteration map scale, the image score
  with the best AUROC on the validation images (normal and synthetic defects) and its
  threshold, the smallest mask region normal images never reach, the range of
  frame-level statistics of normal images (validation and training inputs). The
  projection's thresholds and decision depend on the stop rule (its maps do): each rule carries its own (``stop_rules[name]
  ["segmentation"]``, ``["decision"]``); the top-level ones are the rule in force's;
- the default projection parameters;
- for the unet family, ``permutation``: the permutation scores' normalisers (the mean of each
  permutation's score on the normal validation images, Puzzle-AE's Eq. 6) and thresholds
  (``eproj.train.puzzle.permutation_calibration``).

Validation images are the source's (flipped copies added for textures, which look
alike mirrored); synthetic defects are the project's defect generator
(``eproj.train.defects``) applied to validation crops with a seed of their own. A
source without foreign textures (not ``textures:``) has no synthetic defects: the
rule is then ``DEFAULT_RULE`` and the image score ``DEFAULT_IMAGE_SCORE``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from eproj.decision import IMAGE_SCORES, frame_range, largest_region, rec_error_map, tile_scores, tile_std
from eproj.train.checkpoint import (CHECKPOINT_FORMAT, MODEL_FORMAT, FORMAT_VERSION, load_payload,
                                    model_from_payload, save_atomic)
from eproj.train.data import DataSource, load_source, recorded_fit
from eproj.train.defects import add_defect
from eproj.train.losses import dssim_map, l2_map, reconstruction_loss
from eproj.train.metrics import aupro, image_auroc, pixel_auroc
from eproj.train.models import Autoencoder
from eproj.train.projection import ProjectionConfig, loss_terms, update_step

LR_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
CAP = 100  # the iteration cap of the training-min rule and the longest trajectory simulated
# the validation rule's candidates: (k, cap): stop at the median Lr of normal validation images
# after k iterations (k None: at the training minimum), at most cap iterations. The short caps
# let a model whose defects are projected in a few steps bound what an unseen normal tile
# above the gate can cost.
RULE_GRID = tuple((k, cap) for k in (1, 3, 10, 30, None) for cap in (2, 3, 5, 10, 20, 30, 50, 100))
DEFAULT_RULE = (10, 100)
FULL_RULE = "100 iterations"  # the quality reference: every sample takes CAP steps, no stop, no gate
DEFAULT_IMAGE_SCORE = "rec_error_max"
QUALITY_SLACK = 0.005
NORMAL_ITERATIONS = 3.0
RANGE_MARGIN = 2.0  # frame range: [min / margin, max * margin] of the normal validation statistics
DEFECT_SEED = 7919  # the synthetic validation defects' own seed (the test set uses the source's)


def lr_values(model: Autoencoder, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """(N,) float64 Lr of each of (N, C, S, S) inputs."""
    values = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            loss, _ = reconstruction_loss(model, torch.from_numpy(images[start:start + batch]))
            values.append(loss.numpy())
    return np.concatenate(values).astype(np.float64)


def lr_statistics(model: Autoencoder, images: np.ndarray, batch: int = 64) -> dict[str, float]:
    """Lr over (N, C, S, S) training inputs: min, max, mean and ``LR_QUANTILES``."""
    lr = lr_values(model, images, batch)
    stats = {"count": int(lr.size), "min": float(lr.min()), "max": float(lr.max()), "mean": float(lr.mean())}
    stats.update({f"q{q:g}": float(np.quantile(lr, q)) for q in LR_QUANTILES})
    return stats


def validation_sets(source: DataSource) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normal validation images (N, C, S, S) and, for texture sources, the same crops
    flipped with a synthetic defect each: (M, C, S, S) images and (M, S, S) masks (M may be 0)."""
    normal = source.validation()
    if source.kind == "texture":
        normal = np.concatenate([normal, normal[:, :, :, ::-1]])
    normal = np.ascontiguousarray(normal, dtype=np.float32)
    foreign = getattr(source, "foreign", None)
    size = normal.shape[-1]
    if not foreign:
        return normal, normal[:0], np.zeros((0, size, size), bool)
    rng = np.random.default_rng(DEFECT_SEED)
    crops = np.concatenate([normal, normal[:, :, ::-1, :]])[: 3 * len(normal) // 2]
    images, masks = [], []
    for crop in crops:
        image, mask, _ = add_defect(rng, np.ascontiguousarray(crop.transpose(1, 2, 0)), foreign)
        images.append(image.transpose(2, 0, 1))
        masks.append(mask)
    return normal, np.ascontiguousarray(np.stack(images), dtype=np.float32), np.stack(masks)


def trajectories(model: Autoencoder, images: np.ndarray, config: ProjectionConfig, steps: int = CAP,
                 batch: int = 32, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The projection of each image without any stop, every iterate kept (``progress``: a bar of the
    iterations over every batch on stderr).

    Every sample's iterates depend on it alone, so the result of any stop rule is the
    iterate at the sample's stop time. Returns Lr (N, steps + 1) float64, the iterates
    (N, steps + 1, C, S, S) float16 and f(x0) (N, C, S, S) float32.
    """
    config = config.with_(stop_threshold=None, energy_tol=0.0, max_iters=steps)
    n = len(images)
    lr = np.zeros((n, steps + 1))
    iterates = np.zeros((n, steps + 1) + images.shape[1:], np.float16)
    reconstructions = np.zeros_like(images)
    bar = tqdm(total=-(-n // batch) * steps, desc="calibrate: projection", unit="it", disable=not progress,
               leave=False)
    for start in range(0, n, batch):
        x0 = torch.from_numpy(images[start:start + batch])
        x, rows = x0.clone(), slice(start, start + len(x0))
        iterations = torch.zeros(len(x0), dtype=torch.int64)
        active = torch.ones(len(x0), dtype=torch.bool)
        m = torch.zeros_like(x0) if config.step == "adam" else None
        v = torch.zeros_like(x0) if config.step == "adam" else None
        for t in range(steps + 1):
            loss, reconstruction, grad = loss_terms(model, x)
            lr[rows, t] = loss.numpy()
            iterates[rows, t] = x.numpy()
            if t == 0:
                reconstructions[rows] = reconstruction.numpy()
            if t == steps:
                break
            step = update_step(x, x0, reconstruction, grad, loss, active, iterations, config, None, m, v)
            x, m, v, iterations = step.x, step.m, step.v, step.iterations
            bar.update()
    bar.close()
    return lr, iterates, reconstructions


def stop_times(lr: np.ndarray, threshold: float | None, cap: int, gate: float | None,
               rec_max: np.ndarray | None = None, gate_rec: float | None = None,
               first_update: bool = True) -> np.ndarray:
    """The iterations each sample takes under a rule, from its unstopped Lr (N, T+1), as
    ``project`` takes them: the first t with Lr <= threshold, at most ``cap``; with a gate, a
    sample with Lr(x0) <= gate (and, with ``gate_rec``, its reconstruction error's largest
    pixel ``rec_max`` (N,) <= gate_rec), or under the threshold at x0, keeps the first update (1)
    or, without ``first_update``, takes no step (0)."""
    times = np.full(len(lr), cap)
    if threshold is not None:
        hit = lr[:, :cap + 1] <= threshold
        times = np.where(hit.any(axis=1), hit.argmax(axis=1), cap)
    if gate is not None and cap > 0:
        passed = lr[:, 0] <= gate
        if gate_rec is not None:
            if rec_max is None:
                raise ValueError("a gate on the reconstruction error needs rec_max")
            passed &= rec_max <= gate_rec
        finished = passed | (times == 0)
        times = np.where(finished, 1 if first_update else 0, times)
    return times


def _maps_at(images: np.ndarray, iterates: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DSSIM and squared-residual maps (N, S, S) of each image against its iterate at ``times``."""
    x0 = torch.from_numpy(images)
    target = torch.from_numpy(iterates[np.arange(len(images)), times].astype(np.float32))
    with torch.no_grad():
        return dssim_map(x0, target).numpy(), l2_map(x0, target).numpy()


def _rule_maps(dssim: np.ndarray, recon_dssim: np.ndarray, times: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The maps the runtime reports (``eproj.decision.scale_maps``): each sample's map times
    ``scale[t]`` for its t steps; one that took none gets its reconstruction map times scale[0]."""
    out = dssim.copy()
    still = times == 0
    out[still] = recon_dssim[still]
    return out * scale[np.minimum(times, len(scale) - 1)].astype(np.float32)[:, None, None]


def normal_quantiles(images: np.ndarray, iterates: np.ndarray, recon_dssim: np.ndarray, quantile: float) -> np.ndarray:
    """(T+1,) the ``quantile`` of DSSIM(x0, x_t) over the pixels of the normal validation images
    for every t (t = 0: of their reconstruction maps). The map of an iterate grows with t; a
    tile's map divided by the value at its t is on the same scale whatever its stop time."""
    x0 = torch.from_numpy(images)
    values = [float(np.quantile(recon_dssim, quantile))]
    with torch.no_grad():
        for t in range(1, iterates.shape[1]):
            m = dssim_map(x0, torch.from_numpy(iterates[:, t].astype(np.float32))).numpy()
            values.append(float(np.quantile(m, quantile)))
    return np.maximum(np.array(values), 1e-12)


def _projection_threshold(dssim: np.ndarray, times: np.ndarray, quantile: float) -> float | None:
    """The pixel threshold of the projection's maps of the normal samples that took steps."""
    moved = times > 0
    return float(np.quantile(dssim[moved], quantile)) if moved.any() else None


def choose_rule(lr: np.ndarray, iterates: np.ndarray, images: np.ndarray, masks: np.ndarray, normal: np.ndarray,
                recon_dssim: np.ndarray, train_min: float, levels: np.ndarray,
                rec_max: np.ndarray | None = None,
                progress: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate the 100-iteration projection, the training-min rule and every ``RULE_GRID``
    rule, with and without the gate, on the validation images
    (``normal`` (N,) bool marks the normal ones; ``masks`` (N, S, S) the defects) and pick the
    validation rule. The gate passes the tiles whose Lr(x0) and, with ``rec_max`` (N,), whose
    reconstruction error's largest pixel are both at most those of every normal validation image.
    ``progress``: a bar over the candidate rules on stderr (minutes on a CPU: each distinct rule's
    maps are scored by pixel AUROC and AUPRO).
    Returns the chosen rule's entry and every rule's entry (settings and validation figures)."""
    gate = float(lr[normal, 0].max())
    gate_rec = None if rec_max is None else float(rec_max[normal].max())
    gates = [("no gate", None, None, True), ("gate Lr", gate, None, True)]
    if gate_rec is not None:
        gates += [("gate Lr+rec", gate, gate_rec, True), ("gate Lr+rec, no step", gate, gate_rec, False)]
    candidates = [(FULL_RULE, None, CAP, None, None, True, None),
                  ("training-min", train_min, CAP, None, None, True, None)]
    for k, cap in RULE_GRID:
        threshold = train_min if k is None else float(np.median(lr[normal, k]))
        for label, gated, gated_rec, first_update in gates:
            candidates.append((f"k={k} cap={cap} {label}", threshold, cap, gated, gated_rec, first_update, k))
    has_defects = bool((~normal).any())
    table, cache = [], {}
    for name, threshold, cap, gated, gated_rec, first_update, k in tqdm(
            candidates, desc="calibrate: stop rules", unit="rule", disable=not progress, leave=False):
        times = stop_times(lr, threshold, cap, gated, rec_max, gated_rec, first_update)
        ungated = stop_times(lr, threshold, cap, None)
        key = tuple(times) + tuple(ungated)
        if key not in cache:
            dssim, _ = _maps_at(images, iterates, times)
            maps = _rule_maps(dssim, recon_dssim, times, 1.0 / levels)  # AUROC, AUPRO: any common factor
            entry = {"pixel_auroc": pixel_auroc(list(maps), list(masks)) if has_defects else None,
                     "aupro": aupro(list(maps), list(masks), 0.3) if has_defects else None}
            cache[key] = entry
        table.append({"rule": name, "k": k, "stop_threshold": threshold, "max_iters": cap, "gate_lr": gated,
                      "gate_rec_error": gated_rec, "gate_first_update": first_update,
                      "mean_iterations": float(times.mean()),
                      "mean_iterations_normal": float(times[normal].mean()),
                      "mean_iterations_defective": float(times[~normal].mean()) if has_defects else None,
                      **cache[key]})
    reference = table[0]  # the 100-iteration projection
    rules = table[2:]
    if not has_defects:
        chosen = next(r for r in rules if (r["k"], r["max_iters"]) == DEFAULT_RULE and r["gate_lr"] is not None)
        return chosen, table

    def good(r: dict[str, Any]) -> bool:
        return (r["pixel_auroc"] >= reference["pixel_auroc"] - QUALITY_SLACK
                and r["aupro"] >= reference["aupro"] - QUALITY_SLACK
                and r["mean_iterations_normal"] <= NORMAL_ITERATIONS)

    eligible = [r for r in rules if good(r)]
    if eligible:
        chosen = min(eligible, key=lambda r: (r["mean_iterations"], -r["aupro"]))
    else:  # none keeps the quality: the best quality among the rules cheap on normal images
        cheap = [r for r in rules if r["mean_iterations_normal"] <= NORMAL_ITERATIONS] or rules
        chosen = max(cheap, key=lambda r: (r["pixel_auroc"] + r["aupro"], -r["mean_iterations"]))
    return chosen, table


def calibrate(model: Autoencoder, source: DataSource, projection: ProjectionConfig = ProjectionConfig(),
              quantile: float = 0.99, n_train: int = 256, progress: bool = True) -> dict[str, Any]:
    """Compute the calibration dict stored in ``model.pt`` (see the module docstring)."""
    train_inputs = source.train_sample(n_train, seed=12345)
    stats = lr_statistics(model, train_inputs)
    train_normal = {"lr0": lr_values(model, train_inputs), "x0_std": tile_std(train_inputs)}
    projection = projection.with_(stop_threshold=None)
    normal_images, defect_images, defect_masks = validation_sets(source)
    images = np.concatenate([normal_images, defect_images])
    normal = np.arange(len(images)) < len(normal_images)
    size = images.shape[-1]
    masks = np.concatenate([np.zeros((len(normal_images), size, size), bool), defect_masks])
    if progress:
        print(f"calibrate: projecting {len(normal_images)} normal and {len(defect_images)} synthetic-defect "
              f"validation images for {CAP} iterations")
    lr, iterates, reconstructions = trajectories(model, images, projection, progress=progress)
    with torch.no_grad():
        x0 = torch.from_numpy(images)
        recon_dssim = dssim_map(x0, torch.from_numpy(reconstructions)).numpy()
        recon_l2 = l2_map(x0, torch.from_numpy(reconstructions)).numpy()
    rec_error = rec_error_map(images, reconstructions)
    recon = {"dssim": float(np.quantile(recon_dssim[normal], quantile)),
             "l2": float(np.quantile(recon_l2[normal], quantile)),
             "score": float(np.quantile(recon_dssim[normal].reshape(normal.sum(), -1).max(axis=1), quantile))}
    levels = normal_quantiles(images[normal], iterates[normal], recon_dssim[normal], quantile)
    rec_max = rec_error.reshape(len(images), -1).max(axis=1)
    chosen, table = choose_rule(lr, iterates, images, masks, normal, recon_dssim, stats["min"], levels, rec_max,
                                progress=progress)
    rules = {"validation": {"stop_threshold": chosen["stop_threshold"], "max_iters": chosen["max_iters"],
                            "gate_lr": chosen["gate_lr"], "gate_rec_error": chosen["gate_rec_error"],
                            "gate_first_update": chosen["gate_first_update"], "k": chosen["k"]},
             "training-min": {"stop_threshold": stats["min"], "max_iters": CAP, "gate_lr": None,
                              "gate_rec_error": None}}
    for rule in rules.values():
        rule.update(rule_calibration(rule, lr, iterates, images, normal, recon, recon_dssim, rec_error, levels,
                                     quantile, train_normal))
    active = rules["validation"]
    calibration = {"lr_stats": stats, "stop_rule": "validation", "stop_threshold": active["stop_threshold"],
            "stop_rules": rules, "stop_rule_selection": table, "quantile": quantile,
            "input": source.input_record(), "validation_images": int(normal.sum()),
            "validation_defect_images": int((~normal).sum()),
            "segmentation": {"reconstruction": recon, "projection": active["segmentation"]},
            "decision": active["decision"], "projection": projection.with_(max_iters=active["max_iters"]).to_dict()}
    if model.config.family == "unet":  # Puzzle-AE's permutation scores: normalisers and thresholds
        from eproj.train.puzzle import permutation_calibration

        calibration["permutation"] = permutation_calibration(model, normal_images, source.fit, quantile)
    return calibration


def rule_calibration(rule: dict[str, Any], lr: np.ndarray, iterates: np.ndarray, images: np.ndarray,
                     normal: np.ndarray, recon: dict[str, float], recon_dssim: np.ndarray, rec_error: np.ndarray,
                     levels: np.ndarray, quantile: float,
                     train_normal: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The projection's segmentation thresholds and the decision (``eproj.decision``) under one stop
    rule, from the validation trajectories: ``{"segmentation": ..., "decision": ...}``.

    The frame range spans the frame statistics of the normal validation images and of the
    training inputs in ``train_normal`` (name -> (M,) values: a frame as well explained as the
    training data is normal, not unlike it); it bounds Lr(x0) and the pixels' standard
    deviation (a uniform frame falls below it), not the map's mean, whose low values only say
    that a tile is well explained."""
    rec_max = rec_error.reshape(len(images), -1).max(axis=1)
    times = stop_times(lr, rule["stop_threshold"], rule["max_iters"], rule["gate_lr"], rec_max,
                       rule.get("gate_rec_error"), rule.get("gate_first_update", True))
    ungated = stop_times(lr, rule["stop_threshold"], rule["max_iters"], None)
    plain_dssim, plain_l2 = _maps_at(images[normal], iterates[normal], ungated[normal])
    moved = ungated[normal] > 0
    t_proj = _projection_threshold(plain_dssim, ungated[normal], quantile) or recon["dssim"]
    scale = (t_proj / levels)[:rule["max_iters"] + 1]  # every map on the scale of the rule's own maps
    dssim, _ = _maps_at(images, iterates, times)
    maps = _rule_maps(dssim, recon_dssim, times, scale)
    scores = tile_scores(maps, rec_error, lr[:, 0], t_proj)
    defects = bool((~normal).any())
    aurocs = {name: (image_auroc(scores[name], ~normal) if defects else None) for name in IMAGE_SCORES}
    image_score = (max(IMAGE_SCORES, key=lambda name: (aurocs[name], name == DEFAULT_IMAGE_SCORE)) if defects
                   else DEFAULT_IMAGE_SCORE)
    score_threshold = float(np.quantile(scores[image_score][normal], quantile))
    segmentation = {"dssim": t_proj,
                    "l2": float(np.quantile(plain_l2[moved], quantile)) if moved.any() else recon["l2"],
                    "score": score_threshold}
    decision = {
        "image_score": image_score, "score_threshold": score_threshold,
        "image_score_validation_auroc": aurocs,
        "min_region_area": int(max(largest_region(m > t_proj) for m in maps[normal]) + 1),
        "frame_range": frame_range({"lr0": np.concatenate([lr[normal, 0],
                                                           train_normal["lr0"] if train_normal else []]),
                                    "x0_std": np.concatenate([tile_std(images[normal]),
                                                              train_normal["x0_std"] if train_normal else []])},
                                   RANGE_MARGIN),
        "range_margin": RANGE_MARGIN,
        "zero_iteration_map_scale": float(scale[0]),
        "map_scale": [float(v) for v in scale],
        "gate_lr": rule["gate_lr"],
        "gate_rec_error": rule.get("gate_rec_error"),
        "gate_first_update": rule.get("gate_first_update", True),
    }
    return {"segmentation": segmentation, "decision": decision}


def write_model(run_dir: str | Path, data: str | None = None, progress: bool = True) -> Path:
    """Calibrate the run's latest checkpoint and write ``model.pt`` beside it."""
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoint.pt"
    payload = load_payload(ckpt, CHECKPOINT_FORMAT)
    train = dict(payload["train"])
    model = model_from_payload(payload, ckpt)
    half = train.get("weights") == "float16"
    if half:  # calibrate the weights that will be shipped
        model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    source = load_source(data or train["data"], size=model.config.size, seed=int(train.get("seed", 0)),
                         fit=recorded_fit(train))
    calibration = calibrate(model, source, progress=progress)
    state = {k: (v.half() if half else v) for k, v in model.state_dict().items()}
    out = run_dir / "model.pt"
    save_atomic({"format": MODEL_FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict(),
                 "train": train, "step": int(payload["step"]), "model": state,
                 "calibration": calibration}, out)
    return out


def recalibrate(model_path: str | Path, data: str | None = None, out: str | Path | None = None,
                progress: bool = True) -> Path:
    """Calibrate a ``model.pt`` again from its recorded training data (or ``data``) and
    write it to ``out`` (default: in place); the weights are kept byte for byte."""
    model_path = Path(model_path)
    payload = load_payload(model_path, MODEL_FORMAT)
    model = model_from_payload(payload, model_path)
    train = dict(payload.get("train", {}))
    spec = data or train.get("data")
    if not spec:
        from eproj.errors import ConfigError

        raise ConfigError(f"{model_path} does not record its training data; pass the data spec")
    source = load_source(spec, size=model.config.size, seed=int(train.get("seed", 0)), fit=recorded_fit(train))
    payload = dict(payload, calibration=calibrate(model, source, progress=progress))
    target = Path(out) if out else model_path
    save_atomic(payload, target)
    return target
