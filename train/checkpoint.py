"""Saving and loading runs without unpickling arbitrary objects.

A run directory holds:

- ``checkpoint.pt``: the training state (model, Adam state, step, data RNG), to resume;
- ``model.pt``: what evaluation, the demo and export use: the model config,
  the weights and the calibration (training-set Lr statistics, stop and
  segmentation thresholds).

Both are written atomically (temporary file, then rename) with ``torch.save``
and read with ``torch.load(weights_only=True, mmap=True)``, which accepts tensors
and plain containers only. Before a file is read, its zip members must unpack to
no more than the file holds (``torch.save`` stores them uncompressed: a compressed
member is a zip bomb) and to at most ``MAX_CHECKPOINT_BYTES``. Before a model is
built, the stored tensors must have the names and shapes its config implies (the
model is first built on the meta device, which allocates nothing), so a small file
whose config claims a huge model is refused without allocating it; and every
weight, and every calibration number, must be finite.
"""

from __future__ import annotations

import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from eproj.errors import CheckpointError
from eproj.train.models import Autoencoder, ModelConfig, build_model

CHECKPOINT_FORMAT = "eproj-checkpoint"
MODEL_FORMAT = "eproj-model"
FORMAT_VERSION = 1
# the most a checkpoint may unpack to: the largest eproj model with its Adam state is far below it
MAX_CHECKPOINT_BYTES = 4 << 30
# what the zip members may hold beyond the file's own size (none for what torch.save writes)
_ARCHIVE_SLACK_BYTES = 1 << 20


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` to ``path`` so that a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _check_archive(path: Path) -> None:
    """CheckpointError unless ``path`` is a zip archive (the format torch.save writes) whose members
    unpack to no more than the file's own size (plus a small slack) and ``MAX_CHECKPOINT_BYTES``."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{path} is corrupted or not an eproj file (not the zip archive torch.save "
                              f"writes: {exc})") from exc
    unpacked = sum(member.file_size for member in members)
    on_disk = path.stat().st_size
    if unpacked > min(on_disk + _ARCHIVE_SLACK_BYTES, MAX_CHECKPOINT_BYTES):
        raise CheckpointError(f"{path} is corrupted or not an eproj file: its {len(members)} zip members "
                              f"unpack to {unpacked} bytes from a {on_disk}-byte file (torch.save stores them "
                              f"uncompressed, at most {MAX_CHECKPOINT_BYTES} bytes); refusing a zip bomb")


def _torch_detail(exc: Exception) -> str:
    """The informative line of a torch.load error, without PyTorch's advice about ``weights_only``
    (eproj never loads a checkpoint with ``weights_only=False``)."""
    advice = ("weights_only", "weights only load failed", "trusted source", "documentation of torch.load",
              "torch.load")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    kept = [line for line in lines if not any(a in line.lower() for a in advice)]
    return kept[0][:300] if kept else "no detail"


def load_payload(path: Path, expected_format: str) -> dict[str, Any]:
    """Read a file written by ``save_atomic`` and check its format tag and version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist (or is not a regular file)")
    _check_archive(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} is corrupted or not an eproj file: it holds objects other than tensors "
                              f"and plain containers ({_torch_detail(exc)}), and eproj never unpickles "
                              f"arbitrary objects") from None
    except Exception as exc:  # torch raises many types for damaged files
        raise CheckpointError(f"{path} is corrupted or not an eproj file ({type(exc).__name__}: "
                              f"{_torch_detail(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not an {expected_format} file (format tag {got!r})")
    if payload.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {payload.get('version')!r}; "
                              f"this eproj reads version {FORMAT_VERSION}")
    return payload


def _check_state(config: ModelConfig, state: Any, path: Path) -> dict[str, torch.Tensor]:
    """The stored weights, after checking them against ``config`` before the model is built:
    the same names, the shapes the config implies (from a model built on the meta device,
    which allocates no memory), floating-point and finite values. CheckpointError otherwise."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the weights must be a dict of tensors, got {type(state).__name__}")
    with torch.device("meta"):
        expected = build_model(config).state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: the weights do not fit the stored model config ({config}): "
                              f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    for name, want in expected.items():
        got = state[name]
        if not isinstance(got, torch.Tensor) or not got.is_floating_point():
            raise CheckpointError(f"{path}: weight {name} must be a floating-point tensor, got "
                                  f"{getattr(got, 'dtype', type(got).__name__)}")
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"{path}: the weights do not fit the stored model config ({config}): "
                                  f"{name} has shape {tuple(got.shape)}, the config implies {tuple(want.shape)}")
    for name, tensor in state.items():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            raise CheckpointError(f"{path}: weight {name} has {int(finite.numel() - finite.sum())} NaN/Inf values "
                                  f"of {finite.numel()}; a model with non-finite weights answers NaN for every "
                                  f"frame (a diverged or damaged run)")
    return state


def model_from_payload(payload: dict[str, Any], path: Path) -> Autoencoder:
    """The model of a loaded payload (eval mode, float32), after ``_check_state``."""
    try:
        config = ModelConfig.from_dict(dict(payload["config"]))
    except Exception as exc:
        raise CheckpointError(f"{path}: the stored model config is not valid ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    state = _check_state(config, payload.get("model"), path)
    try:
        model = build_model(config)
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except Exception as exc:
        raise CheckpointError(f"{path}: the weights do not fit the stored model config "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    model.eval()
    return model


def check_calibration(calibration: Any, path: Path) -> dict[str, Any]:
    """The calibration of a ``model.pt`` after checking its numbers: ``stop_threshold`` and every
    ``segmentation`` threshold and ``lr_stats`` value finite. CheckpointError naming the field otherwise."""
    def number(value: Any, field: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CheckpointError(f"{path}: calibration field {field} must be a finite number, got {value!r}")

    if not isinstance(calibration, dict):
        raise CheckpointError(f"{path}: the calibration must be a dict, got {type(calibration).__name__}")
    number(calibration.get("stop_threshold"), "stop_threshold")
    for section in ("segmentation", "lr_stats"):
        values = calibration.get(section, {})
        if not isinstance(values, dict):
            raise CheckpointError(f"{path}: calibration field {section} must be a dict, got {values!r}")
        for key, value in values.items():
            if isinstance(value, dict):
                for kind, threshold in value.items():
                    number(threshold, f"{section}.{key}.{kind}")
            else:
                number(value, f"{section}.{key}")
    return calibration


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
    calibration = check_calibration(payload["calibration"], path)
    return TrainedModel(model_from_payload(payload, path), calibration, payload.get("train", {}), path)


def save_model(trained: TrainedModel, path: Path) -> Path:
    """Write ``trained`` as a ``model.pt`` (weights in float16 if it was trained for that)."""
    half = trained.train.get("weights") == "float16"
    state = {k: (v.half() if half else v) for k, v in trained.model.state_dict().items()}
    save_atomic({"format": MODEL_FORMAT, "version": FORMAT_VERSION, "config": trained.config.to_dict(),
                 "train": dict(trained.train), "step": int(trained.train.get("steps", 0)), "model": state,
                 "calibration": trained.calibration}, Path(path))
    return Path(path)
