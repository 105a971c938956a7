"""Fuzzing the two doors user data comes in by: bundle manifests and frame arrays.

Whatever comes, the answer is a clear ``EprojError`` or a result eproj vouches for (or
records as failed), never another exception: Hypothesis mutates one field of a valid
manifest at a time, and builds frames of every dtype, rank and size, with NaN and Inf,
as plain, masked and ``np.matrix`` arrays and lists of them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from eproj.bundle import load_manifest, write_manifest
from eproj.errors import EprojError
from eproj.runtime.bundle import Bundle
from eproj.runtime.frames import to_batch

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# -- manifests -----------------------------------------------------------------------------------

_SHAPE = ["N", 1, 16, 16]


def _valid_manifest() -> dict:
    """A manifest as export writes it for a 16 x 16 gray l2ae (without schema_version and files)."""
    graph = {"inputs": {"x": _SHAPE}, "outputs": {"reconstruction": _SHAPE, "loss": ["N"], "grad": _SHAPE}}
    return {
        "eproj_version": "0.1.0", "family": "l2ae",
        "model": {"family": "l2ae", "architecture": "bergmann", "size": 16, "channels": 1, "latent": 4},
        "input": {"size": 16, "channels": 1, "layout": "NCHW", "dtype": "float32", "value_range": [0.0, 1.0],
                  "channel_order": "gray", "normalisation": "/255", "fit": "resize"},
        "lr_definition": "sum of squares", "stop_threshold": 1.5, "lr_stats": {"min": 1.5, "max": 3.0},
        "segmentation": {"projection": {"dssim": 0.1, "l2": 0.01, "score": 0.2},
                         "reconstruction": {"dssim": 0.2, "l2": 0.02, "score": 0.3}},
        "projection": {"alpha": 0.5, "lam": 0.05, "weighting": "hadamard", "step": "plain", "max_iters": 100,
                       "energy_tol": 0.0, "stop_threshold": None},
        "opset": 17,
        "graphs": {"encoder": {"file": "encoder.onnx", "inputs": {"x": _SHAPE}, "outputs": {"mu": ["N", 4]}},
                   "decoder": {"file": "decoder.onnx", "inputs": {"z": ["N", 4]},
                               "outputs": {"reconstruction": _SHAPE}},
                   "step": {"file": "step.onnx", **graph}},
        "weights": {"file": "model.pt", "format": "eproj model"},
        "ensemble": {"file": "ensemble.json", "threshold": 0.5},
    }


@pytest.fixture(scope="module")
def fake_bundle(tmp_path_factory) -> Path:
    """A bundle folder of placeholder files (load_manifest hashes files, it does not parse them)."""
    folder = tmp_path_factory.mktemp("fuzz") / "bundle"
    folder.mkdir()
    for name in ("encoder.onnx", "decoder.onnx", "step.onnx", "model.pt"):
        (folder / name).write_bytes(name.encode() * 10)
    (folder / "ensemble.json").write_text(json.dumps({"features": ["rec_error"], "mean": [0.1], "scale": [0.2],
                                                      "coef": [3.0], "intercept": -1.0}))
    write_manifest(folder, _valid_manifest())
    return folder


_JSON_LEAVES = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats()
                | st.text(max_size=12) | st.sampled_from(["../step.onnx", "/etc/passwd", "a/../../b", "", ".",
                                                           "step.onnx", "sub/x", "\x00", "NaN", "Infinity"]))
_JSON = st.recursive(_JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)


def _paths(value, prefix=()):
    """Every key path into ``value`` (objects and lists)."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in children:
        yield prefix + (key,)
        yield from _paths(item, prefix + (key,))


def _use(bundle: Bundle) -> None:
    """What the runtime reads of a loaded bundle."""
    assert bundle.family and bundle.size >= 1 and bundle.channels in (1, 3) and bundle.fit
    assert math.isfinite(bundle.stop_threshold)
    bundle.projection_config()
    for method in ("projection", "reconstruction", "ensemble"):
        for kind in ("dssim", "score"):
            try:
                assert math.isfinite(bundle.threshold(method, kind))
            except EprojError:
                pass
    for graph in ("encoder", "decoder", "step", "step_fp16"):
        try:
            assert bundle.graph_path(graph).resolve().is_relative_to(bundle.folder.resolve())
        except EprojError:
            pass
    for reader in (lambda: bundle.weights_path, lambda: bundle.ensemble):
        try:
            reader()
        except EprojError:
            pass


@FUZZ
@given(data=st.data())
def test_a_mutated_manifest_is_refused_clearly_or_loads_sound(fake_bundle, tmp_path_factory, data):
    manifest = json.loads((fake_bundle / "manifest.json").read_text())
    path = data.draw(st.sampled_from(list(_paths(manifest))), label="field")
    target = manifest
    for key in path[:-1]:
        target = target[key]
    if data.draw(st.booleans(), label="delete"):
        del target[path[-1]]
    else:
        target[path[-1]] = data.draw(_JSON, label="value")
    copy = tmp_path_factory.mktemp("mutated") / "bundle"
    copy.mkdir()
    for p in fake_bundle.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    (copy / "manifest.json").write_text(json.dumps(manifest))  # NaN and Infinity as JSON writes them
    try:
        loaded = Bundle.load(copy)
    except EprojError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("loaded")
    _use(loaded)
    json.dumps(load_manifest(copy), allow_nan=False)  # a manifest that loads has no NaN or Infinity


# -- frames --------------------------------------------------------------------------------------

_DTYPES = st.sampled_from([np.uint8, np.uint16, np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_,
                           np.complex64])
_ANY_ARRAY = hnp.arrays(dtype=_DTYPES, shape=hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=20))
# frames of the accepted kinds (H x W, H x W x C, N x H x W x C; uint8, uint16 or float in [0, 1]),
# with now and then a NaN, an Inf or a value outside [0, 1]
_SIDES = st.sampled_from([8, 16]) | st.integers(1, 20)
_IMAGE_SHAPES = st.one_of(st.tuples(_SIDES, _SIDES),
                          st.tuples(_SIDES, _SIDES, st.sampled_from([1, 3])),
                          st.tuples(st.integers(1, 3), _SIDES, _SIDES, st.sampled_from([1, 3])))
_IMAGES = st.one_of(
    hnp.arrays(st.sampled_from([np.uint8, np.uint16]), _IMAGE_SHAPES),
    hnp.arrays(st.sampled_from([np.float16, np.float32, np.float64]), _IMAGE_SHAPES,
               elements=st.floats(0, 1, width=16) | st.sampled_from([np.nan, np.inf, -0.5, 1.5])))
_ARRAYS = st.one_of(_IMAGES, _ANY_ARRAY)


@st.composite
def _frames(draw):
    array = draw(_ARRAYS)
    form = draw(st.sampled_from(["plain"] * 4 + ["masked", "matrix", "list", "tuple", "other"]))
    if form == "masked":
        return np.ma.masked_array(array, mask=draw(hnp.arrays(np.bool_, array.shape)))
    if form == "matrix" and array.ndim == 2:
        return np.asmatrix(array)
    if form == "list":
        return [array, draw(_ARRAYS)]
    if form == "tuple":
        return (array,)
    if form == "other":
        return draw(st.sampled_from([None, "frame.png", 3.5, [[0.5, 0.5]], {"frame": 1}]))
    return array


@FUZZ
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix, built on purpose
@given(frames=_frames(), channels=st.sampled_from([1, 3]), fit=st.sampled_from(["none", "resize", "tile"]),
       order=st.sampled_from(["bgr", "rgb"]))
def test_any_frame_array_is_refused_clearly_or_becomes_a_sound_batch(frames, channels, fit, order):
    try:
        x0, layouts, _ = to_batch(frames, 8, channels, fit, order)
    except EprojError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("accepted")
    assert x0.dtype == np.float32 and x0.ndim == 4 and x0.shape[1:] == (channels, 8, 8)
    assert np.isfinite(x0).all() and x0.min() >= 0 and x0.max() <= 1
    assert len(layouts) >= 1


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
@given(frames=_frames())
def test_the_inspector_answers_clearly_or_records_a_failure(inspector_l2ae, frames):
    try:
        results = inspector_l2ae(frames)
    except EprojError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("failed" if any(r.failed for r in results) else "inspected")
    for r in results:
        assert isinstance(r.defect, bool) and isinstance(r.failed, bool)
        assert math.isfinite(r.score) or r.failed
        assert not r.failed or (r.defect and r.reason)
        json.dumps({"score": r.score, "defect": r.defect, "reason": r.reason}, allow_nan=False)


@pytest.fixture(scope="module")
def inspector_l2ae(bundles):
    from eproj.runtime import Inspector

    with Inspector.from_bundle(bundles["l2ae"][1], backend="onnxruntime", max_iters=2, fit="resize") as inspector:
        yield inspector
