"""TensorRT 10: the bundle's step engine (``eproj build-engine``), GPU memory and
the stream through cuda-python. Tensor addresses are bound once per batch
size, the engine is enqueued with ``execute_async_v3``, and after a warm-up the
whole iteration (engine, stop check, update) is captured in a CUDA graph and
replayed; if capture fails it falls back to plain launches and says so.

Written to NVIDIA's documented TensorRT 10 API and type-checked with mypy
against tensorrt-stubs; it has not run (no TensorRT in this workplace).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from eproj.cpp_ext import device_array
from eproj.errors import ConfigError
from eproj.runtime.backends.base import Backend
from eproj.runtime.bundle import Bundle

_ITEMSIZE = {"float32": 4, "uint8": 1, "int32": 4}


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
        from eproj.export.tensorrt import load_engine, require_tensorrt

        require_tensorrt()
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            raise ConfigError("the tensorrt backend needs cuda-python: pip install cuda-python") from None
        self._cudart = cudart
        graph = "step_fp16" if precision == "fp16" else "step"
        self.engine = load_engine(bundle.folder / f"{graph}.engine")
        self.cuda_graphs = cuda_graphs
        self.captured = False
        self._stream = _check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate")
        self.stream = int(self._stream)
        self._allocations: list[int] = []
        self._contexts: list[Any] = []
        self._pinned_uploads: list[np.ndarray] = []

    def __del__(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for pointer in getattr(self, "_allocations", []):
            cudart.cudaFree(pointer)

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        nbytes = max(1, int(np.prod(shape)) * _ITEMSIZE[dtype])
        pointer = int(_check(self._cudart.cudaMalloc(nbytes), "cudaMalloc"))
        self._allocations.append(pointer)
        return device_array(pointer, shape, dtype)

    def _pointer(self, buffer: Any) -> int:
        return int(buffer.__cuda_array_interface__["data"][0])

    def upload(self, dst: Any, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host)
        self._pinned_uploads.append(host)  # alive until the next synchronize
        _check(self._cudart.cudaMemcpyAsync(self._pointer(dst), host.ctypes.data, host.nbytes,
                                            self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream),
               "cudaMemcpyAsync (upload)")

    def download(self, src: Any) -> np.ndarray:
        cai = src.__cuda_array_interface__
        dtype = {"<f4": np.float32, "|u1": np.uint8, "<i4": np.int32}[cai["typestr"]]
        out = np.empty(cai["shape"], dtype=dtype)
        _check(self._cudart.cudaMemcpyAsync(out.ctypes.data, self._pointer(src), out.nbytes,
                                            self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream),
               "cudaMemcpyAsync (download)")
        self.synchronize()
        return out

    def synchronize(self) -> None:
        _check(self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        self._pinned_uploads.clear()

    def prepare_step(self, x: Any, reconstruction: Any, loss: Any, grad: Any) -> Callable[[], None]:
        context = self.engine.create_execution_context()
        if context is None:
            raise RuntimeError("TensorRT could not create an execution context")
        self._contexts.append(context)
        shape = tuple(x.__cuda_array_interface__["shape"])
        if not context.set_input_shape("x", shape):
            raise ConfigError(f"the step engine does not take a batch of shape {shape}; "
                              "rebuild it with a wider batch range (eproj build-engine --max-batch)")
        given = {"x": x, "reconstruction": reconstruction, "loss": loss, "grad": grad}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            buffer = given.get(name)
            if buffer is None:  # kl, kl_grad of the VAE engines
                buffer = self.empty(tuple(context.get_tensor_shape(name)), "float32")
            context.set_tensor_address(name, self._pointer(buffer))
        stream = self.stream

        def step() -> None:
            if not context.execute_async_v3(stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")

        return step

    def capture(self, iteration: Callable[[], None]) -> Callable[[], None]:
        if not self.cuda_graphs:
            return iteration
        cudart = self._cudart
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
            executable = _check(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except RuntimeError as error:
            warnings.warn(f"CUDA graph capture failed ({error}); running plain launches", RuntimeWarning,
                          stacklevel=2)
            return iteration
        self.captured = True
        stream = self._stream

        def replay() -> None:
            _check(cudart.cudaGraphLaunch(executable, stream), "cudaGraphLaunch")

        return replay

    def describe(self) -> str:
        return f"tensorrt (cuda{', CUDA graphs' if self.cuda_graphs else ''})"
