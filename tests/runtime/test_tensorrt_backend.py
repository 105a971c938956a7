"""The TensorRT backend without TensorRT or a GPU: engine loading through the manifest
records, precision, the batch range, and the lifetime of its CUDA resources, on the
recording fakes of tests/tensorrt_stubs/fakes.py (TensorRT 10.3 and 11.4 alike)."""

import gc
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from eproj.engines import EngineError, EngineTarget
from eproj.errors import ConfigError
from eproj.runtime.bundle import Bundle

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "eproj" / "models" / "brick-l2ae.pt"
TARGET = EngineTarget("", "NVIDIA Jetson AGX Orin", "8.7")
VERSIONS = ("10.3.0", "11.4.0.106")

_spec = importlib.util.spec_from_file_location("tensorrt_stubs_fakes", ROOT / "tests" / "tensorrt_stubs" / "fakes.py")
fakes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fakes)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from eproj.export.onnx_graphs import export_bundle

    folder = tmp_path_factory.mktemp("trt-runtime") / "bundle"
    export_bundle(MODEL, folder, fp16=True)
    return folder


@pytest.fixture(params=VERSIONS)
def fake(request, exported, tmp_path, monkeypatch):
    """A bundle with fp32 and fp16 engines built by the fake TensorRT of each version, and the
    fake TensorRT and CUDA runtime the backend then runs on; returns (bundle, trt, cudart)."""
    from eproj.export.tensorrt import build_engines

    version = request.param
    folder = Path(shutil.copytree(exported, tmp_path / "bundle"))
    trt, cudart = fakes.install(monkeypatch, version, cuda=True)
    here = lambda v: EngineTarget(v, TARGET.gpu, TARGET.compute_capability)  # noqa: E731
    monkeypatch.setattr("eproj.export.tensorrt.current_target", here)
    monkeypatch.setattr("eproj.runtime.backends.tensorrt.current_target", here)
    build_engines(folder, min_batch=1, opt_batch=4, max_batch=8)
    build_engines(folder, fp16=True, min_batch=1, opt_batch=4, max_batch=8)
    return Bundle.load(folder), trt, cudart


def _buffers(backend, n: int):
    shape = (n, 1, 128, 128)
    return (backend.empty(shape, "float32"), backend.empty(shape, "float32"), backend.empty((n,), "float32"),
            backend.empty(shape, "float32"))


@pytest.mark.parametrize("precision, engine", [("fp32", "step.engine"), ("fp16", "step_fp16.engine")])
def test_precision_picks_the_engine_build_engine_made(fake, precision, engine):
    from eproj.runtime.backends.tensorrt import TensorRTBackend, load_engine

    bundle, trt, _ = fake
    backend = TensorRTBackend(bundle, precision=precision)
    assert backend.engine.data == (bundle.folder / engine).read_bytes()
    assert engine in backend.describe()
    assert load_engine(bundle, backend.graph).record["file"] == engine
    backend.close()


def test_an_unknown_precision_is_refused(exported):
    from eproj.runtime.backends.tensorrt import TensorRTBackend

    with pytest.raises(ConfigError, match=r"precision must be one of \['fp16', 'fp32'\], got 'int8'"):
        TensorRTBackend(Bundle.load(exported), precision="int8")


def test_loading_refuses_an_engine_of_another_setup(fake, monkeypatch):
    from eproj.runtime.backends.tensorrt import TensorRTBackend

    bundle, trt, cudart = fake
    monkeypatch.setattr("eproj.runtime.backends.tensorrt.current_target",
                        lambda v: EngineTarget(v, "NVIDIA GeForce RTX 4090", "8.9"))
    with pytest.raises(EngineError, match=r"gpu 'NVIDIA Jetson AGX Orin', here 'NVIDIA GeForce RTX 4090'.*"
                                          r"Rebuild it with `eproj build-engine .* --fp16`"):
        TensorRTBackend(bundle, precision="fp16")
    assert cudart.streams == set()  # refused before a stream was made


def test_a_batch_outside_the_engine_range_is_refused(fake):
    from eproj.runtime.backends.tensorrt import TensorRTBackend

    bundle, _, _ = fake
    backend = TensorRTBackend(bundle)
    try:
        with pytest.raises(ConfigError, match=r"takes batches of 1 to 8 images; this batch has 9.*--max-batch"):
            backend.prepare_step(*_buffers(backend, 9))
    finally:
        backend.close()


def test_the_forward_pass_runs_on_the_step_engine(fake):
    """build-engine builds no forward engine: the forward pass is a context of the step engine
    with its gradient bound to a buffer of its own."""
    from eproj.runtime.backends.tensorrt import TensorRTBackend

    bundle, _, cudart = fake
    backend = TensorRTBackend(bundle)
    x, reconstruction, loss, _ = _buffers(backend, 4)
    before = len(cudart.allocations)
    forward = backend.prepare_forward(x, reconstruction, loss)
    context, = backend.engine.contexts
    assert len(cudart.allocations) == before + 1  # the ignored gradient's buffer
    pointer = lambda b: b.__cuda_array_interface__["data"][0]  # noqa: E731
    assert context.shapes["x"] == (4, 1, 128, 128)
    assert {name: context.addresses[name] for name in ("x", "reconstruction", "loss")} == \
        {"x": pointer(x), "reconstruction": pointer(reconstruction), "loss": pointer(loss)}
    forward()
    assert context.launches == 1
    backend.close()


def test_one_context_per_prepared_step_and_every_resource_released_once(fake):
    from eproj.runtime.backends.tensorrt import TensorRTBackend

    bundle, _, cudart = fake
    backend = TensorRTBackend(bundle)
    assert len(cudart.streams) == 1
    steps = {n: backend.prepare_step(*_buffers(backend, n)) for n in (8, 3)}
    contexts = backend.engine.contexts
    assert [c.shapes["x"] for c in contexts] == [(8, 1, 128, 128), (3, 1, 128, 128)]
    assert all(set(c.addresses) == {"x", "reconstruction", "loss", "grad"} for c in contexts)
    replay = backend.capture(steps[8])
    assert backend.captured and len(cudart.executables) == 1 and cudart.graphs == set()  # graph freed at once
    replay()
    steps[3]()
    assert [c.launches for c in contexts] == [2, 1]  # warm-up and capture of 8; the plain launch of 3
    backend.upload(backend.empty((2,), "float32"), np.zeros(2, np.float32))
    assert len(cudart.allocations) == 9
    backend.close()
    assert cudart.streams == set() and cudart.allocations == set() and cudart.executables == set()
    assert backend.engine is None
    calls = len(cudart.calls)
    backend.close()  # idempotent
    del backend
    gc.collect()  # __del__ closes again, quietly
    assert len(cudart.calls) == calls
