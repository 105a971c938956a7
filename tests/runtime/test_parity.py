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
from eproj.decision import map_factors
from eproj.runtime import Inspector
from eproj.train.evaluate import projection_maps
from eproj.train.losses import dssim_map, reconstruction_loss
from eproj.train.models import FAMILIES
from eproj.train.projection import project


def _backend(name: str) -> tuple[str, str, dict]:
    """'backend-device[-threads]' -> the Inspector's backend, device and options."""
    backend, device, *threads = name.split("-")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    if backend == "tensorrt":
        pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    if backend == "openvino":
        pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino onnx)")
    return backend, device, {"threads": int(threads[0])} if threads else {}


# onnxruntime-cpu-2 and openvino-cpu-2 split every batch across two loops side by side
# (ParallelProjector); -1 runs one loop
BACKENDS = ["onnxruntime-cpu-2", "onnxruntime-cpu-1", "openvino-cpu-2", "openvino-cpu-1", "torch-cpu",
            pytest.param("torch-cuda", marks=pytest.mark.cuda), pytest.param("tensorrt-cuda", marks=pytest.mark.cuda)]


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
    """The runtime against the reference with the inspector's parameters and gate; a sample that
    took no step is mapped by its scaled reconstruction map on both sides (projection_maps)."""
    results = inspector(list(frames), known_mask=None if mask is None else list(mask))
    x0 = torch.from_numpy(frames[:, None])
    gate = None if inspector.gate_lr in (None, float("-inf")) else inspector.gate_lr
    ref = project(trained.model, x0, inspector.config,
                  mask=None if mask is None else torch.from_numpy(mask[:, None].astype(np.float32)),
                  gate_threshold=gate, gate_rec_error=inspector.gate_rec_error,
                  gate_first_update=inspector.gate_first_update)
    ref_map = projection_maps(trained.model, x0, ref.projection, ref.iterations.numpy(),
                              inspector.decision.zero_iteration_map_scale, inspector.decision.map_scale)[0]
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
    inspector = Inspector.from_bundle(folder, backend=name, device=device, max_iters=10, fit="none",
                                      stop_rule="training-min", **options)
    _compare(inspector, trained, _frames())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides", [{"step": "adam", "alpha": 0.01}, {"weighting": "none", "alpha": 0.002},
                                       {"weighting": "mask", "alpha": 0.01},
                                       {"energy_tol": 0.02, "max_iters": 30}])
def test_every_projection_variant(bundles, backend, overrides):
    name, device, options = _backend(backend)
    trained, folder = bundles["l2ae"]
    params = {"max_iters": 10, **overrides}
    inspector = Inspector.from_bundle(folder, backend=name, device=device, fit="none", stop_rule="training-min",
                                      **options, **params)
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
    probe = Inspector.from_bundle(folder, backend="onnxruntime", max_iters=0, fit="none", threads=1,
                                  stop_rule="training-min")
    probe(list(frames))
    losses = probe._projectors[len(frames)].backend.download(probe._projectors[len(frames)].final_loss)
    threshold = float(np.median(losses))  # about half the frames start under it
    inspector = Inspector.from_bundle(folder, backend="onnxruntime", max_iters=10, stop_threshold=threshold,
                                      fit="none", threads=2, stop_rule="training-min")
    results = _compare(inspector, trained, frames)
    assert {r.stop_reasons[0] for r in results} >= {"threshold"}
    stopped = [r for r in results if r.iterations == 0]
    assert stopped and all(r.anomaly_map.max() > 0 for r in stopped)  # never the all-zero DSSIM(x0, x0)


def _gate_for(folder, frames: np.ndarray, gated: int, of: str = "lr0") -> float:
    """A bound on Lr(x0) (``of="lr0"``) or on the largest pixel of the reconstruction error
    (``of="rec_error"``) under which exactly ``gated`` of ``frames`` fall, halfway to the next
    tile's value (so that float32 rounding in either the runtime or the reference flips none)."""
    probe = Inspector.from_bundle(folder, backend="onnxruntime", max_iters=0, fit="none", threads=1,
                                  stop_rule="training-min")
    probe(list(frames))
    values = probe.last_batch.lr0 if of == "lr0" else probe.last_batch.rec_error.reshape(len(frames), -1).max(axis=1)
    values = np.sort(values)
    above = values[gated] if gated < len(values) else 2 * values[-1] + 1
    return float((values[gated - 1] + above) / 2)


@pytest.mark.parametrize("first_update", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_gate_and_compaction_match_the_reference(bundles, threads, first_update):
    """Gated samples keep the first update and take no further step, or take no step at all
    (projection x0, iteration 0, mapped by their scaled reconstruction map); the others stop at
    different iterations, so the batch compacts several times: every sample equals the
    reference's, and compacting changes nothing."""
    trained, folder = bundles["l2ae"]
    frames = _frames(8)
    gate = _gate_for(folder, frames, 3)
    options = dict(backend="onnxruntime", max_iters=25, energy_tol=0.01, stop_threshold=float("-inf"),
                   fit="none", threads=threads, stop_rule="training-min", gate_lr=gate,
                   gate_first_update=first_update)
    compacted = Inspector.from_bundle(folder, **options)
    results = _compare(compacted, trained, frames)
    assert [r.stop_reasons[0] for r in results].count("gate") == 3
    assert len({r.iterations for r in results}) >= 2
    projector = compacted._projectors[len(frames)]
    assert any(part._smaller for part in getattr(projector, "parts", [projector]))  # the batch compacted
    gated = [i for i, r in enumerate(results) if r.stop_reasons[0] == "gate"]
    if first_update:
        assert all(results[i].iterations == 1 and results[i].anomaly_map.max() > 0 for i in gated)
    for i in gated if not first_update else ():
        assert results[i].iterations == 0 and np.array_equal(results[i].projection[:, :, 0], frames[i])
    # their map: the reconstruction's DSSIM map times the zero-iteration factor
    x0 = torch.from_numpy(frames[gated][:, None])
    with torch.no_grad():
        want = dssim_map(x0, reconstruction_loss(trained.model, x0)[1]).numpy()
    want *= map_factors(np.zeros(len(gated), np.int64), compacted.decision.map_scale,
                        compacted.decision.zero_iteration_map_scale)[:, None, None]
    assert want.max() > 0  # never the all-zero DSSIM(x0, x0)
    if not first_update:
        np.testing.assert_allclose(np.stack([results[i].anomaly_map for i in gated]), want, rtol=0, atol=1e-3)
    whole = Inspector.from_bundle(folder, compact=False, **options)
    for a, b in zip(results, whole(list(frames))):
        np.testing.assert_allclose(a.projection, b.projection, rtol=0, atol=1e-5)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=0, atol=1e-5)
        assert a.iterations == b.iterations and a.stop_reasons == b.stop_reasons


def _counting(inspector: Inspector) -> dict[str, list[int]]:
    """Record the batch size of every step-graph and forward-graph call the inspector's loops make
    (the backend's prepare hooks wrapped before its first call builds them)."""
    calls: dict[str, list[int]] = {"step": [], "forward": []}
    backend = inspector.backend
    assert backend.workers == 1 and not inspector._projectors
    prepare_step, prepare_forward = backend.prepare_step, backend.prepare_forward

    def counted(kind, prepared, n):
        def call():
            calls[kind].append(n)
            prepared()
        return call

    backend.prepare_step = lambda x, *out: counted("step", prepare_step(x, *out), len(x))
    backend.prepare_forward = lambda x, *out: counted("forward", prepare_forward(x, *out), len(x))
    return calls


def test_a_batch_of_gated_tiles_never_runs_the_step_graph(bundles):
    """Every tile under a gate whose tiles take no step: one forward pass for the batch and no
    step at all; each tile's projection is x0 and its map its reconstruction's, as in the reference."""
    trained, folder = bundles["l2ae"]
    frames = _frames(6)
    inspector = Inspector.from_bundle(folder, backend="onnxruntime", max_iters=10, fit="none", threads=1,
                                      stop_rule="training-min", gate_lr=_gate_for(folder, frames, 6),
                                      gate_first_update=False)
    calls = _counting(inspector)
    results = _compare(inspector, trained, frames)
    assert calls == {"step": [], "forward": [6]}
    assert all(r.iterations == 0 and r.stop_reasons == ["gate"] for r in results)
    np.testing.assert_array_equal(np.stack([r.projection[:, :, 0] for r in results]), frames)


def test_gated_tiles_that_keep_the_first_update_run_the_step_once(bundles):
    """Every tile under a gate whose tiles keep the first update: the step at x0 on the batch once
    (no forward pass: the step gives f(x0) and Lr(x0); no last iterate's loss: no tile is active);
    one iteration each."""
    trained, folder = bundles["l2ae"]
    frames = _frames(6)
    inspector = Inspector.from_bundle(folder, backend="onnxruntime", max_iters=10, fit="none", threads=1,
                                      stop_rule="training-min", gate_lr=_gate_for(folder, frames, 6),
                                      gate_first_update=True)
    calls = _counting(inspector)
    results = _compare(inspector, trained, frames)
    assert calls == {"step": [6], "forward": []}
    assert all(r.iterations == 1 and r.stop_reasons == ["gate"] for r in results)


@pytest.mark.parametrize("bound", ["lr0", "rec_error"])
@pytest.mark.parametrize("compact", [True, False])
def test_a_mixed_batch_runs_the_step_graph_on_the_ungated_tiles_only(bundles, compact, bound):
    """Three of eight tiles gated (by Lr(x0), or by the reconstruction error's largest pixel with
    every Lr(x0) under the gate), taking no step: the forward graph runs once on the eight, and
    every step-graph call runs on the five others (compacting); without compaction on the whole batch."""
    trained, folder = bundles["l2ae"]
    frames = _frames(8)
    gate = dict(gate_lr=_gate_for(folder, frames, 3)) if bound == "lr0" else \
        dict(gate_lr=_gate_for(folder, frames, 8), gate_rec_error=_gate_for(folder, frames, 3, "rec_error"))
    inspector = Inspector.from_bundle(folder, backend="onnxruntime", max_iters=10, fit="none", threads=1,
                                      stop_threshold=float("-inf"), stop_rule="training-min", compact=compact,
                                      gate_first_update=False, **gate)
    calls = _counting(inspector)
    results = _compare(inspector, trained, frames)
    assert [r.stop_reasons[0] for r in results].count("gate") == 3
    assert calls["forward"] == [8]
    assert calls["step"] and set(calls["step"]) == ({5} if compact else {8})
    assert len(calls["step"]) == 10 + 1  # ten steps and the last iterate's loss (nothing converges)


def test_without_gate_or_stop_threshold_the_loop_starts_with_the_step(bundles):
    """No tile can be finished at x0: the forward graph would be wasted, and is not run."""
    trained, folder = bundles["l2ae"]
    inspector = Inspector.from_bundle(folder, backend="onnxruntime", max_iters=3, fit="none", threads=1,
                                      stop_threshold=float("-inf"), stop_rule="training-min", gate_lr=float("-inf"))
    calls = _counting(inspector)
    _compare(inspector, trained, _frames())
    assert calls == {"step": [5] * 4, "forward": []}


def test_the_reconstruction_runs_the_forward_graph_alone(bundles):
    trained, folder = bundles["l2ae"]
    frames = _frames()
    inspector = Inspector.from_bundle(folder, backend="onnxruntime", method="reconstruction", fit="none", threads=1)
    calls = _counting(inspector)
    results = inspector(list(frames))
    assert calls == {"step": [], "forward": [5]}
    x0 = torch.from_numpy(frames[:, None])
    with torch.no_grad():
        lr0, reconstruction = reconstruction_loss(trained.model, x0)
    np.testing.assert_allclose(np.stack([r.projection[:, :, 0] for r in results]), reconstruction[:, 0].numpy(),
                               rtol=0, atol=1e-4)
    np.testing.assert_allclose(inspector.last_batch.lr0, lr0.numpy(), rtol=1e-4)


def test_long_runs_drift_no_more_than_float32_itself(bundles):
    trained, folder = bundles["l2ae"]
    frames = _frames()
    inspector = Inspector.from_bundle(folder, backend="onnxruntime", max_iters=60, fit="none",
                                      stop_rule="training-min")
    got = np.stack([r.projection[:, :, 0] for r in inspector(list(frames))])
    x0 = torch.from_numpy(frames[:, None])
    ref32 = project(trained.model, x0, inspector.config).projection[:, 0].numpy()
    ref64 = project(trained.model.double(), x0.double(), inspector.config).projection[:, 0].numpy()
    trained.model.float()
    floor = np.abs(ref32 - ref64).max()
    assert np.abs(got - ref64).max() <= 2 * floor + 1e-4
    assert np.quantile(np.abs(got - ref32), 0.999) <= 1e-3
