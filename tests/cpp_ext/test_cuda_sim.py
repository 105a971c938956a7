"""The simulated CUDA device itself (cpp_ext/sim): what it runs, and that it
fails a launch that breaks CUDA's rules instead of passing it silently. Its
self-test kernels are in cpp_ext/sim/selftest.cpp."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import eproj.cpp_ext as kernels

pytestmark = pytest.mark.cuda_sim

SUCCESS = "cudaSuccess"


@pytest.fixture(scope="module")
def sim():
    try:
        return importlib.import_module("eproj.cpp_ext._kernels_sim")
    except ImportError:
        pytest.skip("the simulated CUDA device is not built: install eproj with -Ccmake.define.EPROJ_CUDA_SIM=ON "
                    "(make install does)")


class Memory:
    """float32 buffers of the simulated device, freed at the end of the test."""

    def __init__(self, sim):
        self.sim = sim
        self.pointers: list[int] = []

    def floats(self, count: int) -> int:
        pointer = self.sim.malloc(4 * count)
        self.pointers.append(pointer)
        return pointer

    def read(self, pointer: int, count: int) -> np.ndarray:
        host = np.empty(count, np.float32)
        self.sim.memcpy(host.ctypes.data, pointer, host.nbytes, "device_to_host")
        return host


@pytest.fixture
def memory(sim):
    before = sim.allocation_count()
    mem = Memory(sim)
    yield mem
    sim.clear_sticky_error()
    for pointer in mem.pointers:
        sim.free(pointer)
    sim.get_last_error()
    assert sim.allocation_count() == before


def launch(sim, name, out, grid=(1, 1, 1), block=(32, 1, 1), shared=0, arg=0, stream=0):
    return sim.selftest_launch(name, grid, block, shared, out, arg, stream)


def expect_failure(sim, result, name, *fragments):
    """The launch failed with `name`; its description holds every fragment."""
    assert result[0] == name, result
    for fragment in fragments:
        assert fragment in result[1], (fragment, result[1])


# ---------------------------------------------------------------------------
# what runs
# ---------------------------------------------------------------------------

def test_every_thread_of_every_block_runs_once(sim, memory):
    out = memory.floats(12 * 64)
    assert launch(sim, "thread_rank", out, grid=(3, 2, 2), block=(8, 4, 2))[0] == SUCCESS
    np.testing.assert_array_equal(memory.read(out, 12 * 64), np.arange(12 * 64, dtype=np.float32))


@pytest.mark.parametrize("width", [32, 16, 8, 4, 1])
def test_shuffles_follow_the_cuda_definitions(sim, memory, width):
    out = memory.floats(4 * 64)
    assert launch(sim, "shuffles", out, block=(64, 1, 1), arg=width)[0] == SUCCESS
    got = memory.read(out, 4 * 64).reshape(64, 4)
    t = np.arange(64)
    base = t // width * width
    down = np.where(t % width + 3 < width, t + 3, t)
    up = np.where(t % width - 2 >= 0, t - 2, t)
    xor = np.where((t % 32 ^ 5) < t % 32 // width * width + width, t // 32 * 32 + (t % 32 ^ 5), t)
    index = base + (t % 32 + 1) % width
    np.testing.assert_array_equal(got, np.stack([down, up, xor, index], axis=1).astype(np.float32))


def test_a_shuffle_over_part_of_a_warp(sim, memory):
    out = memory.floats(32)
    assert launch(sim, "half_warp_shuffle", out, arg=16)[0] == SUCCESS
    got = memory.read(out, 32)
    np.testing.assert_array_equal(got[:16], np.minimum(np.arange(16) + 1, 15).astype(np.float32))
    assert np.isnan(got[16:]).all()  # never written


@pytest.mark.parametrize("block", [(32, 1, 1), (64, 1, 1), (256, 1, 1), (1024, 1, 1), (32, 16, 1), (16, 4, 1)])
def test_the_block_reductions_of_common_cuh(sim, memory, block):
    """block_sum and block_max over 1-D and 2-D blocks (their documented domain)."""
    n = int(np.prod(block))
    out = memory.floats(3)
    assert launch(sim, "block_sum", out, grid=(3, 1, 1), block=block)[0] == SUCCESS
    np.testing.assert_array_equal(memory.read(out, 3), np.full(3, n * (n + 1) / 2, np.float32))
    out = memory.floats(6)
    assert launch(sim, "block_max", out, grid=(3, 1, 1), block=block)[0] == SUCCESS
    np.testing.assert_array_equal(memory.read(out, 6).reshape(3, 2), np.tile([n - 1, 2 * n], (3, 1)))


def test_dynamic_shared_memory_starts_as_nan_bytes_in_every_block(sim, memory):
    """read_shared reads before it writes; the second and third block must not see the first's 1.0."""
    out = memory.floats(3 * 64)
    assert launch(sim, "read_shared", out, grid=(3, 1, 1), block=(64, 1, 1), shared=256)[0] == SUCCESS
    got = memory.read(out, 3 * 64)
    assert (got.view(np.uint32) == 0xFFFFFFFF).all()


def test_device_memory_starts_as_nan_bytes(sim, memory):
    assert (memory.read(memory.floats(100), 100).view(np.uint32) == 0xFFFFFFFF).all()


@pytest.mark.parametrize("direction", [0, 2], ids=["upper-neighbour", "lower-neighbour"])
def test_a_missing_barrier_shows_up_in_either_direction(sim, memory, direction):
    """Threads run in thread order in one block and in reverse order in the next,
    so a read of another thread's shared-memory write without a barrier between
    them reads NaN in one of them, whichever neighbour it reads."""
    n = 64
    expected = np.arange(n) + (1 if direction == 0 else -1)
    expected = np.clip(expected, 0, n - 1).astype(np.float32)
    out = memory.floats(2 * n)
    assert launch(sim, "neighbour", out, grid=(2, 1, 1), block=(n, 1, 1), shared=4 * n, arg=direction | 1)[0] == SUCCESS
    np.testing.assert_array_equal(memory.read(out, 2 * n), np.tile(expected, 2))
    assert launch(sim, "neighbour", out, grid=(2, 1, 1), block=(n, 1, 1), shared=4 * n, arg=direction)[0] == SUCCESS
    assert np.isnan(memory.read(out, 2 * n)).sum() >= n - 1


def test_syncwarp_orders_shared_memory_within_a_warp(sim, memory):
    out = memory.floats(64)
    assert launch(sim, "warp_exchange", out, grid=(1, 1, 1), block=(64, 1, 1), shared=256, arg=1)[0] == SUCCESS
    np.testing.assert_array_equal(memory.read(out, 64), (np.arange(64) ^ 1).astype(np.float32))
    assert launch(sim, "warp_exchange", out, grid=(1, 1, 1), block=(64, 1, 1), shared=256, arg=0)[0] == SUCCESS
    assert np.isnan(memory.read(out, 64)).any()  # without it, a lane reads before its neighbour wrote
    result = launch(sim, "warp_exchange", out, grid=(1, 1, 1), block=(64, 1, 1), shared=256, arg=2)
    expect_failure(sim, result, "cudaErrorLaunchFailure", "__syncwarp at selftest.cpp:", "lane 3", "exited")


# ---------------------------------------------------------------------------
# the execution model's errors: the launch fails, the error is sticky
# ---------------------------------------------------------------------------

def test_a_partial_barrier_fails_the_launch(sim, memory):
    out = memory.floats(64)
    result = launch(sim, "partial_barrier", out, block=(64, 1, 1), arg=40)
    expect_failure(sim, result, "cudaErrorLaunchFailure", "__syncthreads() at selftest.cpp:",
                   "reached by 40 of the block's 64 threads; the other 24 had exited")
    assert sim.get_last_error()[0] == "cudaErrorLaunchFailure"  # sticky: cudaGetLastError does not reset it
    with pytest.raises(RuntimeError, match="cudaMalloc failed: cudaErrorLaunchFailure"):
        sim.malloc(16)
    sim.clear_sticky_error()
    assert sim.get_last_error()[0] == SUCCESS
    assert launch(sim, "partial_barrier", out, block=(64, 1, 1), arg=64)[0] == SUCCESS  # every thread: fine
    np.testing.assert_array_equal(memory.read(out, 64), np.ones(64, np.float32))


def test_barriers_at_different_call_sites_fail(sim, memory):
    result = launch(sim, "split_barrier", memory.floats(64), block=(64, 1, 1))
    expect_failure(sim, result, "cudaErrorLaunchFailure", "wait at different __syncthreads() call sites")


def test_a_shuffle_with_an_exited_lane_fails(sim, memory):
    result = launch(sim, "shuffle_lane_exits", memory.floats(64), block=(64, 1, 1), arg=5)
    expect_failure(sim, result, "cudaErrorLaunchFailure", "__shfl_down_sync at selftest.cpp:", "lane 5", "exited")


def test_a_shuffle_whose_lane_waits_at_a_barrier_is_a_deadlock(sim, memory):
    result = launch(sim, "shuffle_against_barrier", memory.floats(64), block=(64, 1, 1), arg=7)
    expect_failure(sim, result, "cudaErrorLaunchFailure", "lane 7 of the mask never arrived",
                   "it waits at __syncthreads() at selftest.cpp:")


def test_a_shuffle_reading_a_lane_outside_its_mask_fails(sim, memory):
    result = launch(sim, "half_warp_shuffle", memory.floats(32), arg=32)
    expect_failure(sim, result, "cudaErrorLaunchFailure", "lane 15 reads lane 16, which is not in the mask 0x0000ffff")


def test_a_write_past_an_allocation_is_an_illegal_address(sim, memory):
    out = memory.floats(10)
    assert launch(sim, "write_at", out, arg=9)[0] == SUCCESS
    result = launch(sim, "write_at", out, arg=10)
    expect_failure(sim, result, "cudaErrorIllegalAddress", "past the end of the 40-byte allocation")
    assert sim.peek_at_last_error()[0] == "cudaErrorIllegalAddress"


def test_a_write_past_the_dynamic_shared_memory_fails(sim, memory):
    out = memory.floats(1)
    assert launch(sim, "shared_write_at", out, shared=256, arg=63)[0] == SUCCESS
    result = launch(sim, "shared_write_at", out, shared=256, arg=64)
    expect_failure(sim, result, "cudaErrorLaunchFailure", "past the end of its 256 bytes of dynamic shared memory")


# ---------------------------------------------------------------------------
# launch configuration: the error goes to cudaGetLastError once, the kernel does not run
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("grid,block,fragment", [
    ((1, 1, 1), (1025, 1, 1), "outside the limits"),
    ((1, 1, 1), (32, 32, 2), "has 2048 threads; at most 1024"),
    ((1, 1, 1), (1, 1, 65), "outside the limits"),
    ((1, 65536, 1), (32, 1, 1), "grid (1, 65536, 1) outside the limits"),
    ((1, 1, 65536), (32, 1, 1), "grid (1, 1, 65536) outside the limits"),
    ((0, 1, 1), (32, 1, 1), "grid (0, 1, 1)"),
])
def test_launch_configuration_errors(sim, memory, grid, block, fragment):
    out = memory.floats(1)
    result = launch(sim, "write_at", out, grid=grid, block=block)
    expect_failure(sim, result, "cudaErrorInvalidConfiguration", fragment)
    assert sim.get_last_error()[0] == SUCCESS  # not sticky: returned once
    assert np.isnan(memory.read(out, 1)).all()  # the kernel did not run


def test_more_than_48_kib_of_dynamic_shared_memory_needs_the_opt_in(sim, memory):
    out = memory.floats(1)
    floats = 16384  # 64 KiB
    try:
        result = launch(sim, "large_shared", out, block=(256, 1, 1), shared=4 * floats, arg=floats)
        expect_failure(sim, result, "cudaErrorInvalidValue", "65536 bytes of dynamic shared memory asked for, "
                       "at most 49152 without cudaFuncSetAttribute")
        assert sim.get_last_error()[0] == SUCCESS
        assert np.isnan(memory.read(out, 1)).all()
        assert launch(sim, "large_shared", out, block=(256, 1, 1), shared=48 * 1024, arg=12288)[0] == SUCCESS
        assert sim.selftest_set_max_dynamic_shared("large_shared", 4 * floats)[0] == SUCCESS
        assert launch(sim, "large_shared", out, block=(256, 1, 1), shared=4 * floats, arg=floats)[0] == SUCCESS
        assert memory.read(out, 1)[0] == floats
        expect_failure(sim, launch(sim, "large_shared", out, block=(256, 1, 1), shared=4 * floats + 4),
                       "cudaErrorInvalidValue", "as cudaFuncSetAttribute set it")
        # the device's most: 227 KiB
        expect_failure(sim, sim.selftest_set_max_dynamic_shared("large_shared", 227 * 1024 + 1),
                       "cudaErrorInvalidValue", "the device allows 0..232448")
        assert sim.get_last_error()[0] == "cudaErrorInvalidValue"  # a failed call is the last error too
        assert sim.selftest_set_max_dynamic_shared("large_shared", 227 * 1024)[0] == SUCCESS
        assert launch(sim, "large_shared", out, block=(1024, 1, 1), shared=227 * 1024, arg=227 * 256)[0] == SUCCESS
        assert memory.read(out, 1)[0] == 227 * 256
    finally:
        sim.selftest_set_max_dynamic_shared("large_shared", 48 * 1024)


# ---------------------------------------------------------------------------
# memory, streams, errors
# ---------------------------------------------------------------------------

def test_malloc_memcpy_free_round_trip(sim):
    before = sim.allocation_count()
    host = np.arange(1000, dtype=np.float32)
    a = sim.malloc(host.nbytes)
    stream = sim.stream_create()
    b = sim.malloc(host.nbytes, stream)  # cudaMallocAsync
    sim.memcpy(a, host.ctypes.data, host.nbytes, "host_to_device")
    sim.memcpy(b, a, host.nbytes, "device_to_device", stream)  # cudaMemcpyAsync
    sim.memset(b, 0, 40)
    back = np.empty_like(host)
    sim.memcpy(back.ctypes.data, b, host.nbytes, "default")
    sim.stream_synchronize(stream)
    np.testing.assert_array_equal(back, np.where(np.arange(1000) < 10, 0, host))
    assert sim.pointer_kind(a) == ("device", 0) and sim.pointer_kind(a + 400) == ("device", 0)
    assert sim.pointer_kind(host.ctypes.data)[0] == "unregistered"
    with pytest.raises(RuntimeError, match="4004 bytes at destination .* run past the end of its 4000-byte allocation"):
        sim.memcpy(a, host.ctypes.data, host.nbytes + 4, "host_to_device")
    with pytest.raises(RuntimeError, match="the source .* is device memory, but the kind says host"):
        sim.memcpy(back.ctypes.data, a, 4, "host_to_host")
    with pytest.raises(RuntimeError, match="is not the start of an allocation"):
        sim.free(a + 4)
    sim.get_last_error()
    sim.free(b, stream)  # cudaFreeAsync
    sim.free(a)
    sim.stream_destroy(stream)
    with pytest.raises(RuntimeError, match="cudaErrorInvalidResourceHandle"):
        sim.stream_destroy(stream)
    sim.get_last_error()
    assert sim.allocation_count() == before
    assert sim.malloc(0) == 0  # zero bytes get no address, as from cudaMalloc


def test_get_last_error_returns_a_non_sticky_error_once(sim):
    with pytest.raises(RuntimeError, match="cudaErrorInvalidValue"):
        sim.free(12345)
    assert sim.peek_at_last_error()[0] == "cudaErrorInvalidValue"
    assert sim.get_last_error()[0] == "cudaErrorInvalidValue"
    assert sim.get_last_error()[0] == SUCCESS


def test_a_launch_on_an_unknown_stream_fails(sim, memory):
    result = launch(sim, "thread_rank", memory.floats(32), stream=0xDEAD)
    expect_failure(sim, result, "cudaErrorInvalidResourceHandle", "stream 0xdead")
    assert sim.get_last_error()[0] == SUCCESS


def test_the_simulated_gpu(sim):
    info = sim.build_info()
    assert info["cuda"] and info["cuda_version"] == "simulated"
    assert sim.cuda_unavailable_reason() == ""


# ---------------------------------------------------------------------------
# the public API on the simulated device
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["sim"], indirect=True)
def test_the_public_api_runs_the_cuda_kernels_here(device, arrays, sim):
    x = np.random.default_rng(0).random((2, 1, 40, 70), dtype=np.float32)
    before = sim.counters()
    result = kernels.dssim_map(arrays.put(x), arrays.put(x[::-1].copy()), stats=True,
                               out=arrays.empty((2, 40, 70), np.float32), max=arrays.empty((2,), np.float32),
                               mean=arrays.empty((2,), np.float32))
    after = sim.counters()
    assert after["launches"] - before["launches"] == 2  # dssim_kernel and stats_kernel
    assert after["blocks"] - before["blocks"] == 2 * 3 * 3 + 2  # 3 x 3 tiles of 32 x 16 per image, 1 block per image
    np.testing.assert_allclose(arrays.get(result.map), kernels.dssim_map(x, x[::-1].copy()).map, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", ["sim"], indirect=True)
def test_a_failed_launch_is_a_runtime_error_naming_the_cause(device, arrays, sim):
    x = arrays.put(np.zeros((1, 1, 16, 16), np.float32))
    with pytest.raises(RuntimeError, match="eproj CUDA: cudaMallocAsync failed: invalid resource handle; "
                                           "simulated device: .*stream 0xbad"):
        kernels.dssim_map(x, x, stats=True, out=arrays.empty((1, 16, 16), np.float32),
                          max=arrays.empty((1,), np.float32), mean=arrays.empty((1,), np.float32), stream=0xBAD)
    # the error was reported once: the next call, on a good stream, runs
    got = kernels.dssim_map(x, x, out=arrays.empty((1, 16, 16), np.float32), stream=arrays.stream())
    assert (arrays.get(got.map) == 0).all()
