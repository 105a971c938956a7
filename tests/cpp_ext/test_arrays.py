"""How the kernels read arrays of other libraries, streams and raw pointers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import eproj.cpp_ext as kernels
from eproj.cpp_ext._arrays import stream_handle, view_of
from eproj.errors import ArrayError


def test_numpy_view():
    a = np.zeros((2, 3), np.float32)
    v = view_of(a, "a")
    assert (v.pointer, v.shape, v.dtype, v.device, v.contiguous) == (a.ctypes.data, (2, 3), "float32", "cpu", True)
    assert not view_of(a.T, "a").contiguous
    assert view_of(a[:, :1], "a").contiguous is False
    assert view_of(a[:1], "a").contiguous  # a leading slice stays C-contiguous


def test_dlpack_cpu_tensor_runs_on_the_cpu_kernels():
    x = torch.rand(2, 1, 20, 20)
    v = view_of(x, "x")
    assert (v.device, v.dtype, v.shape, v.pointer) == ("cpu", "float32", (2, 1, 20, 20), x.data_ptr())
    assert not view_of(x.transpose(2, 3), "x").contiguous
    got = kernels.dssim_map(x, x.flip(-1).contiguous()).map
    np.testing.assert_array_equal(got, kernels.dssim_map(x.numpy(), x.flip(-1).numpy().copy()).map)


def test_cuda_array_interface_is_read_without_touching_the_memory():
    class Fake:  # what CuPy, torch and pycuda expose; the pointer is never dereferenced here
        __cuda_array_interface__ = {"shape": (0, 5), "typestr": "<f4", "data": (0, False), "strides": None,
                                    "version": 3}  # empty: no pointer check needed

    v = view_of(Fake(), "x")
    assert (v.device, v.dtype, v.shape) == ("cuda", "float32", (0, 5))


def test_device_array_describes_a_raw_pointer():
    d = kernels.device_array(1234, (2, 3), "uint8")
    assert d.__cuda_array_interface__ == {"shape": (2, 3), "typestr": "|u1", "data": (1234, False),
                                          "strides": None, "version": 3}
    with pytest.raises(ArrayError, match="dtype must be one of"):
        kernels.device_array(1234, (2, 3), "complex64")


def test_stream_handles_of_each_library():
    class TorchLike:
        cuda_stream = 77

    class CupyLike:
        ptr = 78

    class Protocol:
        def __cuda_stream__(self):
            return (0, 79)

    class IntLike:  # cuda-python's CUstream / cudaStream_t
        def __int__(self):
            return 80

    assert [stream_handle(s) for s in (None, 5, TorchLike(), CupyLike(), Protocol(), IntLike())] == [0, 5, 77, 78, 79, 80]
    with pytest.raises(ArrayError, match="stream: expected a CUDA stream"):
        stream_handle("default")


def test_build_info_says_what_was_built():
    info = kernels.build_info()
    assert set(info) >= {"compiler", "openmp", "cpu_threads", "cpu_avx2", "cuda"}
    assert info["cpu_threads"] >= 1
    if info["cuda"]:
        assert info["cuda_architectures"] and info["cuda_version"]
    assert isinstance(kernels.cuda_available(), bool)


def test_the_dev_build_has_the_cuda_kernels():
    """`make install` (the dev and CI build) asks for the CUDA kernels (EPROJ_CUDA=ON) with the
    simulator (EPROJ_CUDA_SIM=ON); a build with the simulator but without CUDA kernels was not
    made by it. The default `pip install .` is C++ only (tests/cpp_ext/test_build_switch.py)."""
    import importlib.util
    import shutil
    from pathlib import Path

    if importlib.util.find_spec("eproj.cpp_ext._kernels_sim") is None:
        pytest.skip("not the dev build (make install): the simulated device is not built")
    if not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()):
        pytest.skip("no CUDA toolkit here: `make install EPROJ_CUDA=OFF` is the build for such a machine")
    assert kernels.build_info()["cuda"] is True, ("the simulator is built but the CUDA kernels are not: "
                                                   "`make install` builds both (EPROJ_CUDA=ON needs nvcc)")


def test_device_arrays_are_read_as_cuda_memory(arrays):
    if arrays.device == "cpu":
        pytest.skip("device memory")
    x = arrays.put(np.zeros((2, 3, 5), np.float32))
    v = view_of(x, "x")
    assert (v.device, v.device_id, v.dtype, v.shape, v.contiguous) == ("cuda", 0, "float32", (2, 3, 5), True)
    assert kernels._load().pointer_kind(v.pointer) == ("device", 0)
    with pytest.raises(ArrayError, match="x: expected device memory for the CUDA path, got a unregistered pointer"):
        host = np.zeros((2, 3, 5), np.float32)
        view_of(kernels.device_array(host.ctypes.data, host.shape), "x")


def test_kernels_run_on_a_stream_of_their_own(arrays):
    rng = np.random.default_rng(4)
    x, y = rng.random((2, 1, 24, 40), dtype=np.float32), rng.random((2, 1, 24, 40), dtype=np.float32)
    dx, dy = arrays.put(x), arrays.put(y)
    stream = arrays.stream()
    result = kernels.dssim_map(dx, dy, stats=True, out=arrays.empty((2, 24, 40), np.float32),
                               max=arrays.empty((2,), np.float32), mean=arrays.empty((2,), np.float32), stream=stream)
    expected = kernels.dssim_map(x, y, stats=True)
    np.testing.assert_allclose(arrays.get(result.map), expected.map, rtol=0, atol=1e-6)
    np.testing.assert_allclose(arrays.get(result.mean), expected.mean, rtol=1e-6)
