"""Saving and loading runs without unpickling arbitrary objects.

A run directory holds:

- ``checkpoint.pt``: the training state (model, Adam state, step, data RNG), to resume;
- ``model.pt``: what evaluation, the demo and export use: the model config,
  the weights and the calibration (training-set Lr statistics, stop and
  segmentation thresholds).

Both are written atomically (temporary file, then rename) with ``torch.save``
and read with ``torch.load(weights_only=True)``, which accepts tensors and plain
containers only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from eproj.errors import CheckpointError
from eproj.train.models import Autoencoder, ModelConfig, build_model

CHECKPOINT_FORMAT = "eproj-checkpoint"
MODEL_FORMAT = "eproj-model"
FORMAT_VERSION = 1


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` to ``path`` so that a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_payload(path: Path, expected_format: str) -> dict[str, Any]:
    """Read a file written by ``save_atomic`` and check its format tag and version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise CheckpointError(f"{path} is corrupted or not an eproj file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from exc
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not an {expected_format} file (format tag {got!r})")
    if payload.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {payload.get('version')!r}; "
                              f"this eproj reads version {FORMAT_VERSION}")
    return payload


def model_from_payload(payload: dict[str, Any], path: Path) -> Autoencoder:
    try:
        config = ModelConfig.from_dict(dict(payload["config"]))
        model = build_model(config)
        state = {k: v.float() for k, v in payload["model"].items()}
        model.load_state_dict(state)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: the weights do not fit the stored model config "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    model.eval()
    return model


class TrainedModel:
    """A loaded ``model.pt``: the network (eval mode, float32) and its calibration."""

    def __init__(self, model: Autoencoder, calibration: dict[str, Any], train: dict[str, Any], path: Path):
        self.model, self.calibration, self.train, self.path = model, calibration, train, path

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def stop_threshold(self) -> float:
        return float(self.calibration["stop_threshold"])

    def segmentation_threshold(self, method: str, map_kind: str = "dssim") -> float:
        return float(self.calibration["segmentation"][method][map_kind])


def load_model(path: str | Path) -> TrainedModel:
    """Load ``model.pt`` (or the ``model.pt`` inside a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    payload = load_payload(path, MODEL_FORMAT)
    if "calibration" not in payload:
        raise CheckpointError(f"{path} has no calibration; run `eproj calibrate` on its run")
    return TrainedModel(model_from_payload(payload, path), payload["calibration"], payload.get("train", {}), path)


def save_model(trained: TrainedModel, path: Path) -> Path:
    """Write ``trained`` as a ``model.pt`` (weights in float16 if it was trained for that)."""
    half = trained.train.get("weights") == "float16"
    state = {k: (v.half() if half else v) for k, v in trained.model.state_dict().items()}
    save_atomic({"format": MODEL_FORMAT, "version": FORMAT_VERSION, "config": trained.config.to_dict(),
                 "train": dict(trained.train), "step": int(trained.train.get("steps", 0)), "model": state,
                 "calibration": trained.calibration}, Path(path))
    return Path(path)
