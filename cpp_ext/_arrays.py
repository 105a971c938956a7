"""What the kernels need to know of an array: a pointer, its shape, dtype and device.

``view_of`` reads it from a NumPy array, from any object with
``__cuda_array_interface__`` (CuPy, torch CUDA tensors, pycuda, Numba) or
``__dlpack__`` (JAX, ...), and ``device_array`` wraps a raw device pointer
(cuda-python's ``cudaMalloc``) so that it reads like the others.
``stream_handle`` turns a stream object of any of these libraries into the
``cudaStream_t`` value the CUDA kernels are launched on.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from eproj.errors import ArrayError

# __cuda_array_interface__ typestr and DLPack (code, bits) -> our dtype names
_TYPESTRS = {"<f4": "float32", "<f8": "float64", "<f2": "float16", "|u1": "uint8", "|b1": "bool",
             "<i4": "int32", "<i8": "int64"}
_DLPACK_CODES = {(2, 32): "float32", (2, 64): "float64", (2, 16): "float16", (1, 8): "uint8", (6, 8): "bool",
                 (0, 32): "int32", (0, 64): "int64"}
_DLPACK_CPU, _DLPACK_CUDA, _DLPACK_CUDA_HOST, _DLPACK_CUDA_MANAGED = 1, 2, 3, 13
_ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "uint8": 1, "bool": 1, "int32": 4, "int64": 8}
_NUMPY_NAMES = {np.dtype(name): name for name in _ITEMSIZE}  # a dict lookup is faster than dtype.name


class ArrayView(NamedTuple):
    """One array as the kernels see it. ``device`` is "cpu" or "cuda"."""

    name: str
    pointer: int
    shape: tuple[int, ...]
    dtype: str
    device: str
    device_id: int
    contiguous: bool
    readonly: bool

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        where = "cpu" if self.device == "cpu" else f"cuda:{self.device_id}"
        return f"{self.dtype} {self.shape} on {where}"


class DeviceArray:
    """A raw CUDA device pointer with a shape and dtype, readable as a CUDA array.

    For buffers from ``cuda.bindings.runtime.cudaMalloc`` and the like::

        err, ptr = cudart.cudaMalloc(n * c * h * w * 4)
        x = device_array(ptr, (n, c, h, w), "float32")
    """

    def __init__(self, pointer: int, shape: tuple[int, ...], dtype: str = "float32", readonly: bool = False):
        typestr = {v: k for k, v in _TYPESTRS.items()}.get(dtype)
        if typestr is None:
            raise ArrayError(f"device_array: dtype must be one of {sorted(_ITEMSIZE)}, got {dtype!r}")
        if any(int(s) < 0 for s in shape):
            raise ArrayError(f"device_array: shape must be non-negative, got {tuple(shape)}")
        self.__cuda_array_interface__ = {"shape": tuple(int(s) for s in shape), "typestr": typestr,
                                         "data": (int(pointer), bool(readonly)), "strides": None, "version": 3}


def device_array(pointer: Any, shape: tuple[int, ...], dtype: str = "float32", readonly: bool = False) -> DeviceArray:
    """Wrap a raw device pointer (an int, or an object ``int()`` accepts) as a C-contiguous CUDA array."""
    return DeviceArray(int(pointer), shape, dtype, readonly)


def _c_contiguous(shape: tuple[int, ...], strides: tuple[int, ...] | None, itemsize: int) -> bool:
    """C order, with strides in bytes; dimensions of size 1 may have any stride."""
    if strides is None:
        return True
    expected = itemsize
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _cuda_view(name: str, pointer: int, shape: tuple[int, ...], dtype: str, contiguous: bool,
               readonly: bool) -> ArrayView:
    device_id = 0
    if math.prod(shape) > 0:
        from eproj.cpp_ext import _load

        kind, device_id = _load().pointer_kind(pointer)
        if kind == "unknown":  # a build without the CUDA kernels cannot tell, nor run them
            from eproj.cpp_ext import cuda_unavailable_reason

            raise ArrayError(f"{name} is a CUDA array, but the CUDA kernels cannot run here: "
                             f"{cuda_unavailable_reason()}")
        if kind in ("host", "unregistered"):
            raise ArrayError(f"{name}: expected device memory for the CUDA path, got a {kind} pointer "
                             f"(0x{pointer:x}); copy the array to the GPU or call the CPU path with a NumPy array")
    return ArrayView(name, pointer, shape, dtype, "cuda", device_id, contiguous, readonly)


def view_of(obj: Any, name: str) -> ArrayView:
    """Describe ``obj`` for the kernels; ``name`` is the argument name used in errors."""
    if isinstance(obj, np.ndarray):
        flags = obj.flags
        dtype = _NUMPY_NAMES.get(obj.dtype) or obj.dtype.name
        return ArrayView(name, obj.__array_interface__["data"][0], obj.shape, dtype, "cpu", 0,
                         flags.c_contiguous, not flags.writeable)
    try:
        cai = getattr(obj, "__cuda_array_interface__", None)
    except RuntimeError as error:  # torch refuses it for tensors that require grad
        raise ArrayError(f"{name}: its CUDA array interface is refused ({error}); pass a detached array") from None
    if cai is not None:
        dtype = _TYPESTRS.get(cai["typestr"], cai["typestr"])
        shape = tuple(int(s) for s in cai["shape"])
        contiguous = _c_contiguous(shape, cai.get("strides"), _ITEMSIZE.get(dtype, 1))
        pointer, readonly = cai["data"]
        return _cuda_view(name, int(pointer), shape, dtype, contiguous, bool(readonly))
    if hasattr(obj, "__dlpack__"):
        from eproj.cpp_ext import _load

        try:
            info = _load().dlpack_view(obj)
        except TypeError as error:
            raise ArrayError(f"{name}: could not read it through DLPack ({error})") from None
        dtype = _DLPACK_CODES.get((info["dtype_code"], info["dtype_bits"]),
                                  f"dlpack(code={info['dtype_code']}, bits={info['dtype_bits']})")
        shape = tuple(info["shape"])
        strides = tuple(s * _ITEMSIZE.get(dtype, 1) for s in info["strides"])
        contiguous = _c_contiguous(shape, strides, _ITEMSIZE.get(dtype, 1))
        if info["device_type"] == _DLPACK_CPU:
            return ArrayView(name, info["pointer"], shape, dtype, "cpu", 0, contiguous, False)
        if info["device_type"] in (_DLPACK_CUDA, _DLPACK_CUDA_MANAGED):
            return _cuda_view(name, info["pointer"], shape, dtype, contiguous, False)
        raise ArrayError(f"{name}: DLPack device type {info['device_type']} is neither CPU nor CUDA")
    raise ArrayError(f"{name}: expected a NumPy array or a CUDA array (__cuda_array_interface__, DLPack, "
                     f"or eproj.cpp_ext.device_array for a raw pointer), got {type(obj).__name__}")


def stream_handle(stream: Any) -> int:
    """The cudaStream_t value of ``stream``: None (the legacy default stream, 0),
    an int, or a stream object of cuda-python (``__cuda_stream__`` or ``int()``),
    torch (``.cuda_stream``), CuPy (``.ptr``) or pycuda (``.handle``)."""
    if stream is None:
        return 0
    if isinstance(stream, int):
        return stream
    protocol = getattr(stream, "__cuda_stream__", None)
    if protocol is not None:
        return int(protocol()[1])
    for attribute in ("cuda_stream", "ptr", "handle"):
        value = getattr(stream, attribute, None)
        if isinstance(value, int):
            return value
    try:
        return int(stream)
    except (TypeError, ValueError):
        raise ArrayError(f"stream: expected a CUDA stream (an int handle or a stream object of cuda-python, "
                         f"torch, CuPy or pycuda), got {type(stream).__name__}") from None
