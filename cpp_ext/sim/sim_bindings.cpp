// What the tests need of the simulated device beyond the kernels' own
// bindings (module eproj.cpp_ext._kernels_sim): device memory, copies,
// streams, the error state, counters and the self-test kernels. Pointers and
// stream handles are ints, as in eproj.cpp_ext.device_array and
// stream_handle. A failing call raises RuntimeError with the CUDA error name
// and description.
#include "sim_bindings.h"

#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

#include "device.h"
#include "runtime_control.h"
#include "selftest.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace eproj::sim {

namespace {

void check(cudaError_t status, const std::string& call) {
  if (status != cudaSuccess)
    throw std::runtime_error("simulated CUDA: " + call + " failed: " + cudaGetErrorName(status) + ": " +
                             cudaGetErrorString(status));
}

template <typename T>
T* as_pointer(std::uintptr_t value) {
  return reinterpret_cast<T*>(value);
}

cudaStream_t as_stream(std::uintptr_t value) { return reinterpret_cast<cudaStream_t>(value); }

cudaMemcpyKind copy_kind(const std::string& kind) {
  if (kind == "host_to_device") return cudaMemcpyHostToDevice;
  if (kind == "device_to_host") return cudaMemcpyDeviceToHost;
  if (kind == "device_to_device") return cudaMemcpyDeviceToDevice;
  if (kind == "host_to_host") return cudaMemcpyHostToHost;
  if (kind == "default") return cudaMemcpyDefault;
  throw std::invalid_argument("kind: expected host_to_device, device_to_host, device_to_device, host_to_host or "
                              "default, got '" + kind + "'");
}

std::tuple<std::string, std::string> error_tuple(cudaError_t status) {
  return {cudaGetErrorName(status), cudaGetErrorString(status)};
}

dim3 as_dim3(const std::tuple<unsigned, unsigned, unsigned>& v) {
  return dim3(std::get<0>(v), std::get<1>(v), std::get<2>(v));
}

}  // namespace

void add_sim_bindings(nb::module_& m) {
  m.def(
      "malloc",
      [](std::int64_t bytes, std::optional<std::uintptr_t> stream) -> std::uintptr_t {
        if (bytes < 0) throw std::invalid_argument("bytes: expected >= 0, got " + std::to_string(bytes));
        void* p = nullptr;
        if (stream)
          check(cudaMallocAsync(&p, static_cast<std::size_t>(bytes), as_stream(*stream)), "cudaMallocAsync");
        else
          check(cudaMalloc(&p, static_cast<std::size_t>(bytes)), "cudaMalloc");
        return reinterpret_cast<std::uintptr_t>(p);
      },
      "bytes"_a, "stream"_a = nb::none(),
      "Device memory of the simulated device, filled with NaN bytes: cudaMalloc, or cudaMallocAsync on `stream`.");
  m.def(
      "free",
      [](std::uintptr_t pointer, std::optional<std::uintptr_t> stream) {
        if (stream)
          check(cudaFreeAsync(as_pointer<void>(pointer), as_stream(*stream)), "cudaFreeAsync");
        else
          check(cudaFree(as_pointer<void>(pointer)), "cudaFree");
      },
      "pointer"_a, "stream"_a = nb::none(), "cudaFree, or cudaFreeAsync on `stream`.");
  m.def(
      "memcpy",
      [](std::uintptr_t dst, std::uintptr_t src, std::int64_t bytes, const std::string& kind,
         std::optional<std::uintptr_t> stream) {
        if (bytes < 0) throw std::invalid_argument("bytes: expected >= 0, got " + std::to_string(bytes));
        nb::gil_scoped_release release;
        if (stream)
          check(cudaMemcpyAsync(as_pointer<void>(dst), as_pointer<const void>(src), static_cast<std::size_t>(bytes),
                                copy_kind(kind), as_stream(*stream)),
                "cudaMemcpyAsync");
        else
          check(cudaMemcpy(as_pointer<void>(dst), as_pointer<const void>(src), static_cast<std::size_t>(bytes),
                           copy_kind(kind)),
                "cudaMemcpy");
      },
      "dst"_a, "src"_a, "bytes"_a, "kind"_a, "stream"_a = nb::none(),
      "cudaMemcpy (or cudaMemcpyAsync on `stream`) between raw pointers; kind: host_to_device, device_to_host, "
      "device_to_device, host_to_host or default.");
  m.def(
      "memset",
      [](std::uintptr_t pointer, int value, std::int64_t bytes) {
        check(cudaMemset(as_pointer<void>(pointer), value, static_cast<std::size_t>(bytes)), "cudaMemset");
      },
      "pointer"_a, "value"_a, "bytes"_a, "cudaMemset.");
  m.def(
      "stream_create",
      []() -> std::uintptr_t {
        cudaStream_t s = nullptr;
        check(cudaStreamCreate(&s), "cudaStreamCreate");
        return reinterpret_cast<std::uintptr_t>(s);
      },
      "cudaStreamCreate: a stream handle for the kernels' `stream` argument.");
  m.def(
      "stream_destroy", [](std::uintptr_t s) { check(cudaStreamDestroy(as_stream(s)), "cudaStreamDestroy"); },
      "stream"_a);
  m.def(
      "stream_synchronize",
      [](std::uintptr_t s) { check(cudaStreamSynchronize(as_stream(s)), "cudaStreamSynchronize"); }, "stream"_a);
  m.def(
      "get_last_error", []() { return error_tuple(cudaGetLastError()); },
      "cudaGetLastError as (name, description); resets a non-sticky error.");
  m.def(
      "peek_at_last_error", []() { return error_tuple(cudaPeekAtLastError()); },
      "cudaPeekAtLastError as (name, description).");
  m.def("clear_sticky_error", &clear_sticky_error,
        "Forget a sticky error (a failed launch), so that later tests run on a clean device.");
  m.def("allocation_count", &allocation_count, "Allocations of the simulated device not yet freed.");
  m.def(
      "counters",
      []() {
        const Counters& c = counters();
        nb::dict d;
        d["launches"] = c.launches;
        d["blocks"] = c.blocks;
        d["threads"] = c.threads;
        d["switches"] = c.switches;
        return d;
      },
      "Launches, blocks, threads and fiber switches the simulated device has run.");
  m.def(
      "selftest_launch",
      [](const std::string& name, std::tuple<unsigned, unsigned, unsigned> grid,
         std::tuple<unsigned, unsigned, unsigned> block, std::int64_t shared_bytes, std::uintptr_t out, int arg,
         std::uintptr_t stream) {
        nb::gil_scoped_release release;
        return error_tuple(launch_selftest(name, as_dim3(grid), as_dim3(block), static_cast<std::size_t>(shared_bytes),
                                           as_pointer<float>(out), arg, as_stream(stream)));
      },
      "name"_a, "grid"_a, "block"_a, "shared_bytes"_a, "out"_a, "arg"_a = 0, "stream"_a = 0,
      "Launch a self-test kernel (cpp_ext/sim/selftest.cpp) as name<<<grid, block, shared_bytes, stream>>>(out, "
      "arg); returns cudaGetLastError() after it as (name, description).");
  m.def(
      "selftest_set_max_dynamic_shared",
      [](const std::string& name, int bytes) {
        return error_tuple(set_selftest_max_dynamic_shared(name, bytes));
      },
      "name"_a, "bytes"_a,
      "cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) on a self-test kernel; "
      "returns its result as (name, description).");
}

}  // namespace eproj::sim
