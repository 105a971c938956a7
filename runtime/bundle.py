"""A model bundle as the runtime reads it: the verified manifest with typed access."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eproj.bundle import BundleError, load_manifest
from eproj.config import ProjectionConfig

FITS = ("none", "resize", "tile")


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
            from eproj.errors import ConfigError

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

    def graph_path(self, graph: str) -> Path:
        entry = self.manifest["graphs"].get(graph)
        if entry is None:
            raise BundleError(f"{self.folder} has no {graph} graph (export with --fp16 for step_fp16)")
        return self.folder / entry["file"]

    @property
    def weights_path(self) -> Path:
        entry = self.manifest.get("weights")
        if entry is None:
            raise BundleError(f"{self.folder} carries no weights (model.pt), which the torch backend needs; "
                              "export the bundle again with this eproj")
        return self.folder / entry["file"]

    @property
    def ensemble(self) -> dict[str, Any] | None:
        """The fitted predictor ensemble and its pixel threshold, or None."""
        entry = self.manifest.get("ensemble")
        if entry is None:
            return None
        import json

        return {"model": json.loads((self.folder / entry["file"]).read_text()), "threshold": float(entry["threshold"])}
