"""TensorRT 10 and 11: the bundle's step engine (``eproj build-engine``), GPU memory and
the stream through cuda-python.

``load_engine`` deserializes an engine after checking its manifest record
(``eproj.engines.verified_engine``: its bytes, its graph, the TensorRT version and the
GPU), so an engine built elsewhere or from an older export is refused with the
command that rebuilds it. The bytes deserialized are the bytes whose hash was checked
(read once), never the file reopened. ``precision="fp16"`` runs ``step_fp16.engine``
(``eproj build-engine --fp16``), the strongly typed engine of the mixed-precision step graph.

Each prepared step (one per batch size the inspector meets) has its own execution
context, all on the engine's single optimization profile, with tensor addresses
bound once. One context per profile would not do: a CUDA graph captured from a
context replays that context's shapes and internal buffers, so two batch sizes
sharing one context would corrupt each other's captured iteration. The engine is
enqueued with ``execute_async_v3``; after a warm-up the whole iteration (engine, stop
check, update) is captured in a CUDA graph and replayed; if capture fails it falls
back to plain launches and says so. ``close()`` (also run by ``__del__``) waits for
the stream and destroys the graph executions, contexts, device memory and stream.

The forward pass (``prepare_forward``: the zero-iteration gate's first pass, the
reconstruction baseline) runs on the step engine with its gradient bound to a buffer of
its own and ignored (``Backend.prepare_forward``): ``eproj build-engine`` builds no
engine of the forward graph.

Written to NVIDIA's documented TensorRT 10/11 Python API and type-checked with mypy
against stubs generated from the real bindings of both (tests/tensorrt_stubs); it
has not run on a GPU.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from eproj.cpp_ext import device_array
from eproj.engines import EngineError, current_target, rebuild_hint, require_tensorrt, verified_engine
from eproj.errors import ConfigError
from eproj.runtime.backends.base import Backend
from eproj.runtime.bundle import Bundle

if TYPE_CHECKING:
    import tensorrt

_ITEMSIZE = {"float32": 4, "uint8": 1, "int32": 4}
PRECISIONS = {"fp32": "step", "fp16": "step_fp16"}  # precision -> the graph its engine is built from


class LoadedEngine(NamedTuple):
    """An engine, the runtime that deserialized it (it must outlive the engine) and its manifest record."""

    runtime: "tensorrt.Runtime"
    engine: "tensorrt.ICudaEngine"
    record: dict[str, Any]


def load_engine(bundle: Bundle, graph: str) -> LoadedEngine:
    """Deserialize ``graph``'s engine from ``bundle`` after checking its record against the
    bundle and this machine (EngineError, with the rebuild command, if anything differs)."""
    record, data = verified_engine(bundle.folder, bundle.manifest, graph, current_target(require_tensorrt()))
    import tensorrt as trt

    path = bundle.folder / record["file"]
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise EngineError(f"TensorRT could not load {path} (see its log above); rebuild it with "
                          f"{rebuild_hint(bundle.folder, graph)}")
    return LoadedEngine(runtime, engine, record)


def _check(result: Any, what: str) -> Any:
    """cuda-python calls return (error, *values); raise on an error, return the values."""
    from cuda.bindings import runtime as cudart

    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{what} failed: {cudart.cudaGetErrorString(error)[1].decode()}")
    return values[0] if len(values) == 1 else tuple(values)


class TensorRTBackend(Backend):
    name = "tensorrt"
    device = "cuda"

    def __init__(self, bundle: Bundle, precision: str = "fp32", cuda_graphs: bool = True):
        super().__init__(bundle)
        if precision not in PRECISIONS:
            raise ConfigError(f"the tensorrt backend's precision must be one of {sorted(PRECISIONS)}, "
                              f"got {precision!r}")
        require_tensorrt()
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            raise ConfigError("the tensorrt backend needs cuda-python: pip install cuda-python") from None
        self._allocations: list[int] = []
        self._contexts: list[tensorrt.IExecutionContext] = []
        self._graph_execs: list[Any] = []
        self._uploads_in_flight: list[np.ndarray] = []
        self._stream: Any = None
        self._cudart: Any = cudart
        self.graph = PRECISIONS[precision]
        loaded = load_engine(bundle, self.graph)
        self._runtime: tensorrt.Runtime | None = loaded.runtime
        self.engine: tensorrt.ICudaEngine | None = loaded.engine
        self.batch_range = (int(loaded.record["batch"]["min"]), int(loaded.record["batch"]["max"]))
        self.cuda_graphs = cuda_graphs
        self.captured = False
        self._stream = _check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate")
        self.stream = int(self._stream)

    # -- lifetime --------------------------------------------------------------
    def close(self) -> None:
        """Wait for the stream, then destroy the graph executions, execution contexts, engine,
        device memory and stream. Idempotent; buffers from ``empty`` are invalid afterwards."""
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        failures = []
        stream = getattr(self, "_stream", None)
        if stream is not None:
            failures.append(("cudaStreamSynchronize", cudart.cudaStreamSynchronize(stream)))
        for executable in getattr(self, "_graph_execs", []):
            failures.append(("cudaGraphExecDestroy", cudart.cudaGraphExecDestroy(executable)))
        self._graph_execs = []
        self._contexts = []  # contexts before their engine, the engine before its runtime
        self.engine = None
        self._runtime = None
        for pointer in getattr(self, "_allocations", []):
            failures.append(("cudaFree", cudart.cudaFree(pointer)))
        self._allocations = []
        if stream is not None:
            failures.append(("cudaStreamDestroy", cudart.cudaStreamDestroy(stream)))
        self._stream = None
        self._uploads_in_flight = []
        self._cudart = None
        errors = [what for what, result in failures
                  if (result[0] if isinstance(result, tuple) else result) != cudart.cudaError_t.cudaSuccess]
        if errors:
            raise RuntimeError(f"closing the tensorrt backend: {', '.join(errors)} failed")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit cuda-python may be gone already
            self.close()

    def _live(self) -> Any:
        """cuda-python's runtime module; RuntimeError once the backend is closed."""
        if self._cudart is None:
            raise RuntimeError("the tensorrt backend is closed")
        return self._cudart

    # -- memory ------------------------------------------------------------------
    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        nbytes = max(1, int(np.prod(shape)) * _ITEMSIZE[dtype])
        pointer = int(_check(self._live().cudaMalloc(nbytes), "cudaMalloc"))
        self._allocations.append(pointer)
        return device_array(pointer, shape, dtype)

    def _pointer(self, buffer: Any) -> int:
        return int(buffer.__cuda_array_interface__["data"][0])

    def upload(self, dst: Any, host: np.ndarray) -> None:
        cudart = self._live()
        host = np.ascontiguousarray(host)
        self._uploads_in_flight.append(host)  # alive until the next synchronize
        _check(cudart.cudaMemcpyAsync(self._pointer(dst), host.ctypes.data, host.nbytes,
                                      cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream),
               "cudaMemcpyAsync (upload)")

    def download(self, src: Any) -> np.ndarray:
        cudart = self._live()
        cai = src.__cuda_array_interface__
        dtype = {"<f4": np.float32, "|u1": np.uint8, "<i4": np.int32}[cai["typestr"]]
        out = np.empty(cai["shape"], dtype=dtype)
        _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._pointer(src), out.nbytes,
                                      cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream),
               "cudaMemcpyAsync (download)")
        self.synchronize()
        return out

    def synchronize(self) -> None:
        _check(self._live().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        self._uploads_in_flight.clear()

    # -- the step engine -----------------------------------------------------------
    def prepare_step(self, x: Any, reconstruction: Any, loss: Any, grad: Any) -> Callable[[], None]:
        """A new execution context for this batch size, on the engine's profile, with every
        tensor's address bound (``kl``/``kl_grad`` of the VAE engines get buffers of their own)."""
        self._live()
        engine = self.engine
        assert engine is not None  # set until close(), which _live() guards
        shape = tuple(x.__cuda_array_interface__["shape"])
        low, high = self.batch_range
        if not low <= shape[0] <= high:
            raise ConfigError(f"the {self.graph} engine takes batches of {low} to {high} images; this batch has "
                              f"{shape[0]}. Rebuild it with a range that covers it (eproj build-engine "
                              f"{self.bundle.folder} --min-batch N --max-batch M)")
        context = engine.create_execution_context()
        if context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?)")
        self._contexts.append(context)
        if not context.set_input_shape("x", shape):
            raise ConfigError(f"the {self.graph} engine does not take a batch of shape {shape}")
        given = {"x": x, "reconstruction": reconstruction, "loss": loss, "grad": grad}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            buffer = given.get(name)
            if buffer is None:
                dims = context.get_tensor_shape(name)
                buffer = self.empty(tuple(int(dims[k]) for k in range(len(dims))), "float32")
            if not context.set_tensor_address(name, self._pointer(buffer)):
                raise RuntimeError(f"TensorRT refused the address of tensor {name!r}")
        stream = self.stream

        def step() -> None:
            if not context.execute_async_v3(stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")

        return step

    def capture(self, iteration: Callable[[], None]) -> Callable[[], None]:
        if not self.cuda_graphs:
            return iteration
        cudart = self._live()
        try:
            iteration()  # warm-up: TensorRT sets up its shape-dependent state outside the capture
            self.synchronize()
            _check(cudart.cudaStreamBeginCapture(self._stream,
                                                 cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
                   "cudaStreamBeginCapture")
            try:
                iteration()
            finally:
                graph = _check(cudart.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
            try:
                executable = _check(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            finally:
                _check(cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")  # the executable does not need it
        except RuntimeError as error:
            warnings.warn(f"CUDA graph capture failed ({error}); running plain launches", RuntimeWarning,
                          stacklevel=2)
            return iteration
        self._graph_execs.append(executable)
        self.captured = True
        stream = self._stream

        def replay() -> None:
            _check(cudart.cudaGraphLaunch(executable, stream), "cudaGraphLaunch")

        return replay

    def describe(self) -> str:
        return f"tensorrt (cuda, {self.graph}.engine{', CUDA graphs' if self.cuda_graphs else ''})"
