"""The runtime (any backend + the fused kernels) against the reference projection
with the same parameters and iteration count, for every family.

Tolerances: projections and DSSIM maps within 1e-3, masks IoU >= 0.99, equal
iteration counts. Over longer runs float32 itself drifts: a few pixels sit on a
LeakyReLU kink or on sign(x - x0) = 0, and the reference in float32 then
differs from the reference in float64 by as much as the runtime does. The long
test holds the runtime to that: no farther from float64 than float32 is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import texture
from eproj.runtime import Inspector
from eproj.train.losses import dssim_map
from eproj.train.models import FAMILIES
from eproj.train.projection import project


def _backend(name: str) -> tuple[str, str, dict]:
    """'backend-device[-threads]' -> the Inspector's backend, device and options."""
    backend, device, *threads = name.split("-")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    if backend == "tensorrt":
        pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    return backend, device, {"threads": int(threads[0])} if threads else {}


# onnxruntime-cpu-2 splits every batch across two loops side by side (ParallelProjector);
# onnxruntime-cpu-1 runs one loop
BACKENDS = ["onnxruntime-cpu-2", "onnxruntime-cpu-1", "torch-cpu", pytest.param("torch-cuda", marks=pytest.mark.cuda),
            pytest.param("tensorrt-cuda", marks=pytest.mark.cuda)]


def _frames(n: int = 5, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(3)
    frames = np.stack([texture(rng, size) for _ in range(n)]).astype(np.float32)
    frames[1, 8:16, 10:20] = 0.05  # a defect
    frames[2] = rng.random((size, size))  # noise
    return frames


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def _compare(inspector: Inspector, trained, frames: np.ndarray, mask=None):
    results = inspector(list(frames), known_mask=None if mask is None else list(mask))
    x0 = torch.from_numpy(frames[:, None])
    ref = project(trained.model, x0, inspector.config,
                  mask=None if mask is None else torch.from_numpy(mask[:, None].astype(np.float32)))
    ref_map = dssim_map(x0, ref.projection).numpy()
    got = np.stack([r.projection[:, :, 0] for r in results])
    np.testing.assert_allclose(got, ref.projection[:, 0].numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(np.stack([r.anomaly_map for r in results]), ref_map, rtol=0, atol=1e-3)
    for r, m in zip(results, ref_map):
        assert _iou(r.mask, m > inspector.pixel_threshold) >= 0.99
    assert [r.iterations for r in results] == ref.iterations.tolist()
    assert [r.stop_reasons[0] for r in results] == ref.stop_reason
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_matches_the_reference(bundles, family, backend):
    name, device, options = _backend(backend)
    trained, folder = bundles[family]
    inspector = Inspector.from_bundle(folder, backend=name, device=device, max_iters=10, fit="none", **options)
    _compare(inspector, trained, _frames())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides", [{"step": "adam", "alpha": 0.01}, {"weighting": "none", "alpha": 0.002},
                                       {"weighting": "mask", "alpha": 0.01},
                                       {"energy_tol": 0.02, "max_iters": 30}])
def test_every_projection_variant(bundles, backend, overrides):
    name, device, options = _backend(backend)
    trained, folder = bundles["l2ae"]
    params = {"max_iters": 10, **overrides}
    inspector = Inspector.from_bundle(folder, backend=name, device=device, fit="none", **options, **params)
    frames = _frames()
    mask = None
    if overrides.get("weighting") == "mask":
        mask = np.zeros(frames.shape, np.float32)
        mask[:, 5:20, 5:25] = 1
    results = _compare(inspector, trained, frames, mask)
    if mask is not None:
        for r, f, m in zip(results, frames, mask):
            assert np.array_equal(r.projection[:, :, 0][m == 0], f[m == 0])  # known pixels never change


def test_a_stop_threshold_stops_samples_early(bundles):
    trained, folder = bundles["l2ae"]
    frames = _frames()
    probe = Inspector.from_bundle(folder, backend="onnxruntime", max_iters=0, fit="none", threads=1)
    probe(list(frames))
    losses = probe._projectors[len(frames)].backend.download(probe._projectors[len(frames)].final_loss)
    threshold = float(np.median(losses))  # about half the frames start under it
    inspector = Inspector.from_bundle(folder, backend="onnxruntime", max_iters=10, stop_threshold=threshold,
                                      fit="none", threads=2)
    results = _compare(inspector, trained, frames)
    assert {r.stop_reasons[0] for r in results} >= {"threshold"}


def test_long_runs_drift_no_more_than_float32_itself(bundles):
    trained, folder = bundles["l2ae"]
    frames = _frames()
    inspector = Inspector.from_bundle(folder, backend="onnxruntime", max_iters=60, fit="none")
    got = np.stack([r.projection[:, :, 0] for r in inspector(list(frames))])
    x0 = torch.from_numpy(frames[:, None])
    ref32 = project(trained.model, x0, inspector.config).projection[:, 0].numpy()
    ref64 = project(trained.model.double(), x0.double(), inspector.config).projection[:, 0].numpy()
    trained.model.float()
    floor = np.abs(ref32 - ref64).max()
    assert np.abs(got - ref64).max() <= 2 * floor + 1e-4
    assert np.quantile(np.abs(got - ref32), 0.999) <= 1e-3
