"""A model bundle as the runtime reads it: the verified manifest with typed access.

The backends build their sessions, programs and engines from bytes, never from a path:
``Bundle.graph_bytes`` and ``Bundle.file_bytes`` read a file once and check the size and
SHA-256 of those very bytes against the manifest, so what runs is what was hashed. A file
replaced on disk after ``Bundle.load`` is refused (BundleError) when a backend reads it.
``graph_path`` names a graph's file, for messages; nothing should open it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eproj.bundle import FITS, BundleError, bundle_file, load_manifest, read_verified
from eproj.config import ProjectionConfig
from eproj.errors import ConfigError

__all__ = ["Bundle", "FITS"]


@dataclass(frozen=True)
class Bundle:
    """``folder`` and its ``manifest`` (verified by ``eproj.bundle.load_manifest``)."""

    folder: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        folder = Path(path)
        return cls(folder, load_manifest(folder))

    @property
    def family(self) -> str:
        return str(self.manifest["family"])

    @property
    def size(self) -> int:
        return int(self.manifest["input"]["size"])

    @property
    def channels(self) -> int:
        return int(self.manifest["input"]["channels"])

    @property
    def fit(self) -> str:
        """How frames meet the model size by default: "tile", "resize" or "none"."""
        return str(self.manifest["input"].get("fit", "none"))

    @property
    def stop_threshold(self) -> float:
        return float(self.manifest["stop_threshold"])

    def projection_config(self, **overrides: Any) -> ProjectionConfig:
        """The bundle's projection defaults and stop threshold, then ``overrides`` (None values ignored)."""
        values = dict(self.manifest["projection"])
        values["stop_threshold"] = self.stop_threshold
        valid = set(ProjectionConfig.__dataclass_fields__)
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ConfigError(f"unknown projection parameter(s) {unknown}; valid: {sorted(valid)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return ProjectionConfig(**values)

    def threshold(self, method: str, kind: str) -> float:
        """Segmentation threshold of ``method`` for map ``kind`` ("dssim" pixels, "score" images).
        The ensemble's map is a probability: both its thresholds are the stored 0.5."""
        if method == "ensemble":
            ensemble = self.ensemble
            if ensemble is None:
                raise BundleError(f"{self.folder} has no predictor ensemble; export it with --ensemble")
            return ensemble["threshold"]
        try:
            return float(self.manifest["segmentation"][method][kind])
        except KeyError:
            raise BundleError(f"{self.folder}: the manifest has no {kind} threshold for {method}") from None

    def file_bytes(self, name: str) -> bytes:
        """The bytes of bundle file ``name`` (a key of the manifest's ``files``), read once and
        checked against the size and SHA-256 recorded there: build from these bytes, never reopen
        the file. BundleError if ``name`` is not listed, or the file is missing, not a regular file,
        or not the one exported (replaced since export, or since the bundle was loaded)."""
        entry = self.manifest["files"].get(name)
        if entry is None:
            raise BundleError(f"{self.folder}: {name!r} is not listed under the manifest's files "
                              f"(listed: {sorted(self.manifest['files'])}); only hashed files are read")
        return read_verified(self.folder, name, entry["bytes"], entry["sha256"], f"files[{name!r}]",
                             changed="replaced after export, or since the bundle was loaded")

    def graph_bytes(self, graph: str) -> bytes:
        """The ONNX graph ``graph`` ("encoder", "decoder", "step", "forward" or "step_fp16") as verified bytes
        (``file_bytes``), for ``onnxruntime.InferenceSession(bytes)`` and the like."""
        return self.file_bytes(self._graph_entry(graph)["file"])

    def graph_path(self, graph: str) -> Path:
        """Where ``graph``'s file lies, for messages; open ``graph_bytes(graph)`` instead."""
        entry = self._graph_entry(graph)
        return bundle_file(self.folder, entry["file"], f"graphs.{graph}.file")

    def _graph_entry(self, graph: str) -> dict[str, Any]:
        entry = self.manifest["graphs"].get(graph)
        if entry is None:
            raise BundleError(f"{self.folder} has no {graph} graph (export with --fp16 for step_fp16)")
        return dict(entry)

    @property
    def weights_path(self) -> Path:
        """Where the checkpoint (model.pt) lies, for the eager reference of the benchmarks
        (``eproj.train.checkpoint.load_model`` maps the file); ``file_bytes`` reads it verified."""
        entry = self.manifest.get("weights")
        if entry is None:
            raise BundleError(f"{self.folder} carries no weights (model.pt), which the torch backend needs; "
                              "export the bundle again with this eproj")
        return bundle_file(self.folder, entry["file"], "weights.file")

    @property
    def ensemble(self) -> dict[str, Any] | None:
        """The fitted predictor ensemble and its pixel threshold, or None."""
        entry = self.manifest.get("ensemble")
        if entry is None:
            return None
        path = bundle_file(self.folder, entry["file"], "ensemble.file")
        data = self.file_bytes(entry["file"])
        try:
            model = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise BundleError(f"{path} is not a readable JSON ensemble ({type(exc).__name__}: {str(exc)[:200]})") \
                from exc
        return {"model": _check_ensemble(model, path), "threshold": float(entry["threshold"])}


def _check_ensemble(model: Any, path: Path) -> dict[str, Any]:
    """The fitted ensemble (``eproj.predictors.ensemble_map``'s ``model``) after checking its fields:
    ``features`` known predictor names, ``mean``, ``scale`` (non-zero) and ``coef`` one finite number
    per feature, ``intercept`` a finite number. BundleError naming the field otherwise."""
    from eproj.predictors import PREDICTORS

    def numbers(field: str, count: int | None) -> list[float]:
        values = model.get(field)
        if (not isinstance(values, list) or (count is not None and len(values) != count)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in values)):
            want = f"{count} finite numbers (one per feature)" if count is not None else "finite numbers"
            raise BundleError(f"{path}: field {field} must be a list of {want}, got {str(values)[:80]}")
        return values

    if not isinstance(model, dict):
        raise BundleError(f"{path}: expected a JSON object, got {type(model).__name__}")
    features = model.get("features")
    if (not isinstance(features, list) or not features
            or not all(isinstance(f, str) and f in PREDICTORS for f in features)):
        raise BundleError(f"{path}: field features must be a non-empty list of predictor names from "
                          f"{tuple(PREDICTORS)}, got {str(features)[:80]}")
    for field in ("mean", "scale", "coef"):
        numbers(field, len(features))
    if any(v == 0 for v in model["scale"]):
        raise BundleError(f"{path}: field scale must not contain 0 (it divides), got {model['scale']}")
    intercept = model.get("intercept")
    if isinstance(intercept, bool) or not isinstance(intercept, (int, float)) or not math.isfinite(intercept):
        raise BundleError(f"{path}: field intercept must be a finite number, got {intercept!r}")
    return model
