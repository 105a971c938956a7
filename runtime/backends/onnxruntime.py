"""ONNX Runtime: the CPU provider (the embedded default), or the CUDA provider when
onnxruntime-gpu is installed. The step graph runs with I/O binding: its input
and outputs are bound once to the loop's buffers, so nothing is copied per
iteration. The forward graph (``prepare_forward``) runs the same way in a session
of its own, made when first asked for; at ``precision="fp16"``, and for bundles
exported before the forward graph, the step graph stands in for it.

On the CPU, a batch of two or more tiles is split across ``threads`` loops run
side by side, each calling a one-thread session (``workers``, ``serial``); a
single tile uses a session of ``threads`` threads. On CUDA, ONNX Runtime
computes on a stream of its own, so each iteration synchronises the device
before the graph runs; the torch and TensorRT backends share one stream and do
not."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from eproj.errors import ConfigError
from eproj.runtime.backends.base import Backend
from eproj.runtime.bundle import Bundle


class _OrtCudaArray:
    """A device buffer allocated by ONNX Runtime, readable by the kernels as a CUDA array;
    ``dtype`` its NumPy dtype (known here, so an upload never reads the buffer back)."""

    def __init__(self, value: Any, shape: tuple[int, ...], dtype: str):
        self.value = value
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.__cuda_array_interface__ = {"shape": shape, "typestr": _TYPESTRS[dtype],
                                         "data": (value.data_ptr(), False), "strides": None, "version": 3}


_TYPESTRS = {"float32": "<f4", "uint8": "|u1", "int32": "<i4"}


def _pointer(buffer: Any) -> int:
    if isinstance(buffer, np.ndarray):
        return int(buffer.__array_interface__["data"][0])
    return int(buffer.__cuda_array_interface__["data"][0])


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int = 0, precision: str = "fp32",
                 loops: int | None = None):
        """``loops``: on the CPU, how many loops may run side by side on a batch
        (default ``threads``, or every core); 1 runs one loop whose graph uses every
        thread, as for several inspectors sharing the cores."""
        super().__init__(bundle)
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("the onnxruntime backend needs ONNX Runtime: pip install onnxruntime "
                              "(or onnxruntime-gpu for CUDA)") from None
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"onnxruntime device must be cpu or cuda, got {device!r}")
        if device == "cuda" and loops is not None:
            raise ConfigError(f"loops={loops!r} splits batches across CPU loops; the onnxruntime backend "
                              "on cuda runs one loop")
        provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        if provider not in ort.get_available_providers():
            raise ConfigError(f"ONNX Runtime here has no {provider} (available: {ort.get_available_providers()}); "
                              "install onnxruntime-gpu for CUDA")
        if precision not in ("fp32", "fp16"):
            raise ConfigError(f"precision must be fp32 or fp16, got {precision!r}")
        self._ort = ort
        self.device = device
        self.precision = precision
        if loops is not None and loops < 1:
            raise ConfigError(f"loops must be >= 1, got {loops}")
        if device == "cpu":
            self.workers = loops or (threads if threads > 0 else _cpu_cores())
        self._serial: OnnxRuntimeBackend | None = None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # ONNX Runtime's threads spin between graph calls (lower latency); the fused
        # kernels then run on the calling thread alone so that the pools never fight
        self.kernel_threads = 1
        # from the verified bytes, never the path: what runs is what the manifest hashed
        graph = bundle.graph_bytes("step_fp16" if precision == "fp16" else "step")
        self.session = ort.InferenceSession(graph, options, providers=[provider])
        self._options, self._provider = options, provider
        self._forward_session: Any = None  # made by the first prepare_forward
        self._forward_lock = threading.Lock()

    def serial(self) -> "OnnxRuntimeBackend":
        if self.workers == 1:
            return self
        if self._serial is None:
            self._serial = OnnxRuntimeBackend(self.bundle, self.device, threads=1, precision=self.precision)
        return self._serial

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        if self.device == "cpu":
            return np.empty(shape, dtype=dtype)
        value = self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype).type, "cuda", 0)
        return _OrtCudaArray(value, tuple(shape), dtype)

    def upload(self, dst: Any, host: np.ndarray) -> None:
        if self.device == "cpu":
            dst[...] = host
        else:
            dst.value.update_inplace(np.ascontiguousarray(host, dtype=dst.dtype))

    def download(self, src: Any) -> np.ndarray:
        if self.device == "cpu":
            return src.copy()
        return src.value.numpy()

    def prepare_step(self, x: Any, reconstruction: Any, loss: Any, grad: Any) -> Callable[[], None]:
        if self.session is None:
            raise ConfigError("this onnxruntime backend is closed")
        return self._bound(self.session, x, {"reconstruction": reconstruction, "loss": loss, "grad": grad})

    def prepare_forward(self, x: Any, reconstruction: Any, loss: Any) -> Callable[[], None]:
        if self.session is None:
            raise ConfigError("this onnxruntime backend is closed")
        session = self._forward()
        if session is None:
            return super().prepare_forward(x, reconstruction, loss)
        return self._bound(session, x, {"reconstruction": reconstruction, "loss": loss})

    def _forward(self) -> Any:
        """The forward graph's session (made once), or None where the step graph stands in for
        it: at fp16 (there is no float16 forward graph) or in a bundle exported without it."""
        if self.precision != "fp32" or "forward" not in self.bundle.manifest["graphs"]:
            return None
        with self._forward_lock:
            if self._forward_session is None:
                self._forward_session = self._ort.InferenceSession(self.bundle.graph_bytes("forward"), self._options,
                                                                   providers=[self._provider])
            return self._forward_session

    def _bound(self, session: Any, x: Any, given: dict[str, Any]) -> Callable[[], None]:
        """A call of ``session`` with ``x`` and the outputs named in ``given`` bound to those
        buffers; the outputs not given (the VAE step's kl and kl_grad) get buffers of their own."""
        binding = session.io_binding()
        shape = tuple(x.shape)
        binding.bind_input("x", self.device, 0, np.float32, list(shape), _pointer(x))
        extra = {"kl": self.empty((shape[0],), "float32"), "kl_grad": self.empty(shape, "float32")}
        keep = []
        for name in (o.name for o in session.get_outputs()):
            buffer = given.get(name, extra.get(name))
            if buffer is None:
                raise RuntimeError(f"unexpected output {name!r} of an onnxruntime session")
            keep.append(buffer)
            binding.bind_output(name, self.device, 0, np.float32, list(buffer.shape), _pointer(buffer))
        if self.device == "cuda":
            from eproj.cpp_ext import cuda_synchronize

            def step() -> None:
                # ONNX Runtime computes on a stream of its own, which does not wait for the
                # kernels queued on the default stream: synchronise first (every iteration)
                cuda_synchronize()
                session.run_with_iobinding(binding)
        else:
            def step() -> None:
                session.run_with_iobinding(binding)

        step.buffers = keep  # type: ignore[attr-defined]  # keep the bound memory alive with the call
        return step

    def close(self) -> None:
        """Release the sessions (and the one-thread sessions of the loops side by side)."""
        if self._serial is not None:
            self._serial.close()
            self._serial = None
        self.session = None
        self._forward_session = None

    def describe(self) -> str:
        if self.device == "cuda":
            return f"onnxruntime (CUDAExecutionProvider, {self.precision})"
        loops = f", {self.workers} loops side by side on batches" if self.workers > 1 else ""
        return f"onnxruntime (CPUExecutionProvider, {self.precision}{loops})"


def _cpu_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
