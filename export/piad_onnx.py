"""Export a PIAD model.pt to a bundle of two ONNX graphs that ``eproj.runtime.piad`` runs.

``export_piad_bundle`` writes, into one folder:

- ``reconstruct.onnx``: x (N, C, S, S) in [0, 1] -> ``reconstruction`` G(E(x)) (N, C, S, S),
  about [0, 1] (the generator's output is linear, not clamped, as in training and scoring);
- ``score.onnx``: x, y (N, C, S, S) -> ``score`` (N,) = ||f~(x) - f~(y)||_1 / ||f~(x)||_1 and
  ``feature_map`` (N, S, S) = |f~(x) - f~(y)| summed over channels, bilinearly upsampled
  (f~ = (f - mu) / sigma: the feature network with mu and sigma folded into the graph);
- ``manifest.json``: format ``eproj.piad_decision.PIAD_BUNDLE_FORMAT``, the model size and
  channels, the graphs, the calibration's thresholds and verdict, the feature record, and the
  parity of each graph against PyTorch (``parity``: max absolute difference, ONNX Runtime).

N is dynamic in both graphs. The export is refused when a graph differs from PyTorch by more
than ``PARITY_TOLERANCE`` (absolute; for the feature map relative to max(1, |value|)) on the
model's validation-like inputs (random tiles and their reconstructions). The projection with
G(E(.)) as f is not exported.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from eproj import __version__
from eproj.errors import ConfigError
from eproj.files import write_atomic
from eproj.piad_decision import PIAD_BUNDLE_FORMAT
from eproj.train.perceptual import FeatureStats
from eproj.train.piad_calibrate import TrainedPIAD, load_piad_model
from eproj.train.piad_networks import PIAD

PARITY_TOLERANCE = 1e-4
DEFAULT_OPSET = 17


class ReconstructModule(nn.Module):
    """x (N, C, S, S) in [0, 1] -> G(E(x)), the model's ``reconstruct``."""

    def __init__(self, model: PIAD) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.reconstruct(x)


class ScoreModule(nn.Module):
    """x, y (N, C, S, S) -> relative-perceptual-L1 score (N,) and feature map (N, S, S), the
    feature mean and std held as buffers (``eproj.train.piad_calibrate.piad_outputs``' formulas)."""

    def __init__(self, network: nn.Module, stats: FeatureStats) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", stats.mean.detach().float().view(1, -1, 1, 1).clone())
        self.register_buffer("inv_std", (1.0 / stats.std.detach().float()).view(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nx = (self.network(x) - self.mean) * self.inv_std
        ny = (self.network(y) - self.mean) * self.inv_std
        diff = (nx - ny).abs()
        score = diff.flatten(1).sum(1) / nx.abs().flatten(1).sum(1).clamp_min(1e-12)
        feature_map = F.interpolate(diff.sum(1, keepdim=True), size=x.shape[-2:], mode="bilinear",
                                    align_corners=False)[:, 0]
        return score, feature_map


def _export(module: nn.Module, examples: tuple[torch.Tensor, ...], path: Path, inputs: list[str],
            outputs: list[str], opset: int) -> None:
    axes = {name: {0: "N"} for name in inputs + outputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, examples, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parity(trained: TrainedPIAD, folder: Path, n: int = 3, seed: int = 0) -> dict[str, float]:
    """Max differences of the bundle's graphs against PyTorch on ``n`` random tiles (smooth noise
    around mid-grey) and their reconstructions: ``reconstruction`` and ``score`` absolute,
    ``feature_map`` relative to max(1, |value|)."""
    size, channels = trained.config.size, trained.config.channels
    rng = np.random.default_rng(seed)
    x = np.clip(0.5 + 0.2 * rng.standard_normal((n, channels, size, size)), 0, 1).astype(np.float32)
    reconstruct, score = ReconstructModule(trained.model).eval(), ScoreModule(trained.network, trained.stats).eval()
    with torch.no_grad():
        y_ref = reconstruct(torch.from_numpy(x))
        s_ref, m_ref = score(torch.from_numpy(x), y_ref)
    y, = _session(folder / "reconstruct.onnx").run(None, {"x": x})
    s, m = _session(folder / "score.onnx").run(None, {"x": x, "y": y_ref.numpy()})
    return {"reconstruction": float(np.abs(y - y_ref.numpy()).max()),
            "score": float(np.abs(s - s_ref.numpy()).max()),
            "feature_map": float((np.abs(m - m_ref.numpy()) / np.maximum(1.0, np.abs(m_ref.numpy()))).max())}


def export_piad_bundle(model_path: str | Path, out: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write the PIAD bundle of ``model_path`` (a PIAD model.pt or its run folder) into ``out``;
    returns the manifest's path. ConfigError when a graph misses ``PARITY_TOLERANCE``."""
    trained = load_piad_model(model_path)
    if trained.score != "rel_perc_l1":
        raise ConfigError(f"{trained.path} is scored by {trained.score} (an ablation model); the bundle's score "
                          f"graph computes A(x) = rel_perc_l1. Evaluate it with eproj eval")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    size, channels = trained.config.size, trained.config.channels
    example = torch.rand(2, channels, size, size)
    _export(ReconstructModule(trained.model).eval(), (example,), folder / "reconstruct.onnx", ["x"],
            ["reconstruction"], opset)
    _export(ScoreModule(trained.network, trained.stats).eval(), (example, example.flip(0)),
            folder / "score.onnx", ["x", "y"], ["score", "feature_map"], opset)
    differences = parity(trained, folder)
    worst = {k: v for k, v in differences.items() if not v <= PARITY_TOLERANCE}
    if worst:
        raise ConfigError(f"the exported PIAD graphs differ from PyTorch by {worst} (tolerance "
                          f"{PARITY_TOLERANCE}); the bundle in {folder} is not usable")
    cal = trained.calibration
    manifest: dict[str, Any] = {
        "format": PIAD_BUNDLE_FORMAT, "eproj_version": __version__, "family": "piad",
        "size": size, "channels": channels, "opset": opset,
        "graphs": {"reconstruct": "reconstruct.onnx", "score": "score.onnx"},
        "input": cal.get("input"), "data": trained.train.get("data"), "step": trained.step,
        "features": trained.features, "score": cal["score"], "score_threshold": cal["score_threshold"],
        "segmentation": cal["segmentation"], "decision": cal["decision"],
        "parity": {"tolerance": PARITY_TOLERANCE, "max_difference": differences},
    }
    path = folder / "manifest.json"
    write_atomic(path, (json.dumps(manifest, indent=2) + "\n").encode())
    return path
