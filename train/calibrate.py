"""Calibration: what a trained model carries besides its weights.

- Lr statistics on training inputs (min, quantiles, mean): the projection stops
  a sample when its Lr falls under ``stop_threshold``, the training-set minimum;
- segmentation thresholds per method and map kind: a quantile (0.99 by default)
  of the anomaly-map values on normal validation images held out of training,
  and an image-score threshold (the same quantile of their scores);
- the default projection parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from eproj.train.checkpoint import (CHECKPOINT_FORMAT, MODEL_FORMAT, FORMAT_VERSION, load_payload,
                                    model_from_payload, save_atomic)
from eproj.train.data import DataSource, load_source
from eproj.train.evaluate import METHODS, MAP_KINDS, image_score, run_method
from eproj.train.losses import reconstruction_loss
from eproj.train.models import Autoencoder
from eproj.train.projection import ProjectionConfig

LR_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def lr_statistics(model: Autoencoder, images: np.ndarray, batch: int = 64) -> dict[str, float]:
    """Lr over (N, C, S, S) training inputs: min, max, mean and ``LR_QUANTILES``."""
    values = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            loss, _ = reconstruction_loss(model, torch.from_numpy(images[start:start + batch]))
            values.append(loss.numpy())
    lr = np.concatenate(values).astype(np.float64)
    stats = {"count": int(lr.size), "min": float(lr.min()), "max": float(lr.max()), "mean": float(lr.mean())}
    stats.update({f"q{q:g}": float(np.quantile(lr, q)) for q in LR_QUANTILES})
    return stats


def calibrate(model: Autoencoder, source: DataSource, projection: ProjectionConfig = ProjectionConfig(),
              quantile: float = 0.99, n_train: int = 256, progress: bool = True) -> dict[str, Any]:
    """Compute the calibration dict stored in ``model.pt``."""
    stats = lr_statistics(model, source.train_sample(n_train, seed=12345))
    projection = projection.with_(stop_threshold=None)
    validation = source.validation()
    segmentation: dict[str, dict[str, float]] = {}
    for method in METHODS:
        out = run_method(model, validation, method, projection.with_(stop_threshold=stats["min"]),
                         progress=progress, desc=f"calibrate {method}")
        thresholds = {kind: float(np.quantile(out.maps[kind], quantile)) for kind in MAP_KINDS}
        thresholds["score"] = float(np.quantile(image_score(out.maps["dssim"]), quantile))
        segmentation[method] = thresholds
    return {"lr_stats": stats, "stop_threshold": stats["min"], "quantile": quantile,
            "validation_images": int(len(validation)), "segmentation": segmentation,
            "projection": projection.to_dict()}


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
    source = load_source(data or train["data"], size=model.config.size, seed=int(train.get("seed", 0)))
    calibration = calibrate(model, source, progress=progress)
    state = {k: (v.half() if half else v) for k, v in model.state_dict().items()}
    out = run_dir / "model.pt"
    save_atomic({"format": MODEL_FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict(),
                 "train": train, "step": int(payload["step"]), "model": state,
                 "calibration": calibration}, out)
    return out
