// Python bindings of the kernels (module eproj.cpp_ext._kernels).
//
// The public API is eproj.cpp_ext (Python): it validates every array (dtype,
// shape, device, contiguity) with messages naming expected and actual values,
// and passes raw pointers here, which is what lets NumPy, CuPy, torch,
// pycuda and cuda-python buffers share one path. What is checked here are
// the internal invariants the Python layer guarantees.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include <stdexcept>
#include <string>

#include "eproj/build_config.h"
#include "eproj/kernels.h"

#if defined(EPROJ_WITH_CUDA)
#include <cuda_runtime.h>
#endif
#if defined(EPROJ_CUDA_SIM)
#include "sim_bindings.h"  // the same bindings over the simulated device (cpp_ext/sim), for the tests
#endif

namespace nb = nanobind;
using namespace nb::literals;

namespace {

template <typename T>
T* pointer_at(const nb::dict& pointers, const char* name) {
  if (!pointers.contains(name)) return nullptr;
  nb::object value = pointers[name];
  if (value.is_none()) return nullptr;
  return reinterpret_cast<T*>(nb::cast<std::uintptr_t>(value));
}

// A pointer the kernel reads or writes. Null is accepted for an empty array
// (`elements` 0): CUDA allocators (torch's, cudaMalloc) give zero bytes no
// address, and the kernels return before touching an empty batch.
template <typename T>
T* required(const nb::dict& pointers, const char* name, std::int64_t elements) {
  T* p = pointer_at<T>(pointers, name);
  if (p == nullptr && elements != 0)
    throw std::logic_error(std::string("eproj kernels: pointer '") + name + "' missing");
  return p;
}

eproj::UpdateBuffers update_buffers(const nb::dict& ptr, std::int64_t n, std::int64_t c, std::int64_t h,
                                    std::int64_t w, std::int64_t mask_channels) {
  eproj::UpdateBuffers b{};
  b.x = required<float>(ptr, "x", n * c * h * w);
  b.x0 = required<const float>(ptr, "x0", n * c * h * w);
  b.reconstruction = required<const float>(ptr, "reconstruction", n * c * h * w);
  b.grad = required<const float>(ptr, "grad_lr", n * c * h * w);
  b.mask = pointer_at<const float>(ptr, "mask");
  b.m = pointer_at<float>(ptr, "m");
  b.v = pointer_at<float>(ptr, "v");
  b.loss = required<const float>(ptr, "loss", n);
  b.active = required<const std::uint8_t>(ptr, "active", n);
  b.iterations = required<std::int32_t>(ptr, "iterations", n);
  b.distance = required<float>(ptr, "distance", n);
  b.energy = required<float>(ptr, "energy", n);
  b.n = n;
  b.c = c;
  b.h = h;
  b.w = w;
  b.mask_channels = mask_channels;
  return b;
}

eproj::UpdateParams update_params(double alpha, double lam, int weighting, int step, double beta1, double beta2,
                                  double eps, double value_min, double value_max) {
  eproj::UpdateParams p{};
  p.alpha = static_cast<float>(alpha);
  p.lam = static_cast<float>(lam);
  p.weighting = weighting;
  p.step = step;
  p.beta1 = static_cast<float>(beta1);
  p.beta2 = static_cast<float>(beta2);
  p.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  p.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  p.eps = static_cast<float>(eps);
  p.value_min = static_cast<float>(value_min);
  p.value_max = static_cast<float>(value_max);
  return p;
}

void check_update(const eproj::UpdateParams& p, const eproj::UpdateBuffers& b) {
  const bool empty = b.n * b.c * b.h * b.w == 0;  // no buffer is touched; the CUDA ones may be null
  if (p.weighting == eproj::kMask && b.mask == nullptr && !empty)
    throw std::logic_error("eproj kernels: mask weighting without mask");
  if (p.step == eproj::kAdam && (b.m == nullptr || b.v == nullptr) && !empty)
    throw std::logic_error("eproj kernels: adam step without moment buffers");
  if (p.weighting < 0 || p.weighting > 2 || p.step < 0 || p.step > 1)
    throw std::logic_error("eproj kernels: weighting or step out of range");
}

eproj::DssimBuffers dssim_buffers(const nb::dict& ptr, std::int64_t n, std::int64_t c, std::int64_t h,
                                  std::int64_t w) {
  eproj::DssimBuffers b{};
  b.x = required<const float>(ptr, "x", n * c * h * w);
  b.y = required<const float>(ptr, "y", n * c * h * w);
  b.out = required<float>(ptr, "out", n * h * w);
  b.mask = pointer_at<std::uint8_t>(ptr, "mask");
  b.max = pointer_at<float>(ptr, "max");
  b.mean = pointer_at<float>(ptr, "mean");
  if ((b.max == nullptr) != (b.mean == nullptr)) throw std::logic_error("eproj kernels: max and mean go together");
  b.n = n;
  b.c = c;
  b.h = h;
  b.w = w;
  return b;
}

eproj::DssimParams dssim_params(int window, double sigma, double data_range, double threshold, std::int64_t h,
                                std::int64_t w) {
  if (window < 1 || window % 2 == 0 || window > eproj::kMaxWindow)
    throw std::logic_error("eproj kernels: window must be odd and at most 31");
  if (h < window / 2 || w < window / 2) throw std::logic_error("eproj kernels: image smaller than the window radius");
  return eproj::make_dssim_params(window, sigma, data_range, 0.01, 0.03, threshold);
}

#if defined(EPROJ_WITH_CUDA)
// Runs the launch on `device` and restores the caller's current device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&previous_);
    if (device != previous_) {
      const cudaError_t status = cudaSetDevice(device);
      if (status != cudaSuccess)
        throw std::runtime_error(std::string("eproj CUDA: cudaSetDevice failed: ") + cudaGetErrorString(status));
    }
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};
#endif

nb::dict build_info() {
  nb::dict info;
  info["compiler"] = EPROJ_COMPILER;
  info["openmp"] =
#if defined(_OPENMP)
      true;
#else
      false;
#endif
  info["cpu_threads"] = eproj::cpu_threads();
  info["cpu_avx2"] = eproj::cpu_uses_avx2();
#if defined(EPROJ_CUDA_SIM)
  info["cuda"] = true;
  info["cuda_version"] = "simulated";
  info["cuda_architectures"] = "simulated";
#elif defined(EPROJ_WITH_CUDA)
  info["cuda"] = true;
  info["cuda_version"] = EPROJ_CUDA_VERSION;
  info["cuda_architectures"] = EPROJ_CUDA_ARCHITECTURES;
#else
  info["cuda"] = false;
#endif
  return info;
}

// A kernel call with its arguments checked and converted once; calling it
// launches the kernel again (the projection loop's case).
struct UpdateCall {
  bool cuda;
  eproj::UpdateParams params;
  eproj::UpdateBuffers buffers;
  std::uintptr_t stream;
  int device_id;
  int threads;

  void operator()() const {
    nb::gil_scoped_release release;
    if (!cuda) return eproj::update_cpu(params, buffers, threads);
#if defined(EPROJ_WITH_CUDA)
    DeviceGuard guard(device_id);
    eproj::update_cuda(params, buffers, stream);
#endif
  }
};

struct StopCall {
  bool cuda;
  eproj::StopParams params;
  eproj::StopBuffers buffers;
  std::uintptr_t stream;
  int device_id;

  void operator()() const {
    nb::gil_scoped_release release;
    if (!cuda) return eproj::stop_check_cpu(params, buffers);
#if defined(EPROJ_WITH_CUDA)
    DeviceGuard guard(device_id);
    eproj::stop_check_cuda(params, buffers, stream);
#endif
  }
};

struct DssimCall {
  bool cuda;
  eproj::DssimParams params;
  eproj::DssimBuffers buffers;
  std::uintptr_t stream;
  int device_id;
  int threads;

  void operator()() const {
    nb::gil_scoped_release release;
    if (!cuda) return eproj::dssim_map_cpu(params, buffers, threads);
#if defined(EPROJ_WITH_CUDA)
    DeviceGuard guard(device_id);
    eproj::dssim_map_cuda(params, buffers, stream);
#endif
  }
};

bool on_cuda(const std::string& device) {
  if (device == "cpu") return false;
#if defined(EPROJ_WITH_CUDA)
  return true;
#else
  throw std::logic_error("eproj kernels: built without CUDA");
#endif
}

}  // namespace

#if defined(EPROJ_CUDA_SIM)
#define EPROJ_MODULE(m) NB_MODULE(_kernels_sim, m)
#else
#define EPROJ_MODULE(m) NB_MODULE(_kernels, m)
#endif

EPROJ_MODULE(m) {
#if defined(EPROJ_CUDA_SIM)
  m.doc() = "eproj's kernels with the CUDA ones on a simulated device (cpp_ext/sim); test infrastructure.";
  eproj::sim::add_sim_bindings(m);
#else
  m.doc() = "eproj C++/CUDA kernels; use eproj.cpp_ext, which validates arguments.";
#endif

  m.def("build_info", &build_info, "What this build contains: compiler, OpenMP, CUDA version and architectures.");

  nb::class_<UpdateCall>(m, "Update", "The fused update, checked once; call it to run.")
      .def(
          "__init__",
          [](UpdateCall* self, const std::string& device, const nb::dict& pointers, std::int64_t n, std::int64_t c,
             std::int64_t h, std::int64_t w, std::int64_t mask_channels, double alpha, double lam, int weighting,
             int step, double beta1, double beta2, double eps, double value_min, double value_max,
             std::uintptr_t stream, int device_id, int threads) {
            const eproj::UpdateParams p =
                update_params(alpha, lam, weighting, step, beta1, beta2, eps, value_min, value_max);
            const eproj::UpdateBuffers b = update_buffers(pointers, n, c, h, w, mask_channels);
            check_update(p, b);
            new (self) UpdateCall{on_cuda(device), p, b, stream, device_id, threads};
          },
          "device"_a, "pointers"_a, "n"_a, "c"_a, "h"_a, "w"_a, "mask_channels"_a, "alpha"_a, "lam"_a,
          "weighting"_a, "step"_a, "beta1"_a, "beta2"_a, "eps"_a, "value_min"_a, "value_max"_a, "stream"_a,
          "device_id"_a, "threads"_a = 0)
      .def("__call__", &UpdateCall::operator());

  nb::class_<DssimCall>(m, "DssimMap", "The fused DSSIM map, checked once; call it to run.")
      .def(
          "__init__",
          [](DssimCall* self, const std::string& device, const nb::dict& pointers, std::int64_t n, std::int64_t c,
             std::int64_t h, std::int64_t w, int window, double sigma, double data_range, double threshold,
             std::uintptr_t stream, int device_id, int threads) {
            const eproj::DssimParams p = dssim_params(window, sigma, data_range, threshold, h, w);
            const eproj::DssimBuffers b = dssim_buffers(pointers, n, c, h, w);
            new (self) DssimCall{on_cuda(device), p, b, stream, device_id, threads};
          },
          "device"_a, "pointers"_a, "n"_a, "c"_a, "h"_a, "w"_a, "window"_a, "sigma"_a, "data_range"_a,
          "threshold"_a, "stream"_a, "device_id"_a, "threads"_a = 0)
      .def("__call__", &DssimCall::operator());

  nb::class_<StopCall>(m, "StopCheck", "The stop check, checked once; call it to run.")
      .def(
          "__init__",
          [](StopCall* self, const std::string& device, const nb::dict& pointers, std::int64_t n, double lam,
             bool has_threshold, double threshold, double energy_tol, std::uintptr_t stream, int device_id) {
            eproj::StopParams p{};
            p.lam = static_cast<float>(lam);
            p.has_threshold = has_threshold ? 1 : 0;
            p.threshold = static_cast<float>(threshold);
            p.energy_tol = static_cast<float>(energy_tol);
            eproj::StopBuffers b{};
            b.loss = required<const float>(pointers, "loss", n);
            b.distance = required<const float>(pointers, "distance", n);
            b.iterations = required<const std::int32_t>(pointers, "iterations", n);
            b.active = required<std::uint8_t>(pointers, "active", n);
            b.previous = required<float>(pointers, "previous", n);
            b.reason = required<std::int32_t>(pointers, "reason", n);
            b.final_loss = required<float>(pointers, "final_loss", n);
            b.final_energy = required<float>(pointers, "final_energy", n);
            b.n = n;
            new (self) StopCall{on_cuda(device), p, b, stream, device_id};
          },
          "device"_a, "pointers"_a, "n"_a, "lam"_a, "has_threshold"_a, "threshold"_a, "energy_tol"_a, "stream"_a,
          "device_id"_a)
      .def("__call__", &StopCall::operator());

  m.def(
      "cuda_unavailable_reason",
      []() -> std::string {
#if defined(EPROJ_WITH_CUDA)
        return eproj::cuda_unavailable_reason();
#else
        return "eproj was built without CUDA kernels";
#endif
      },
      "Empty when the CUDA kernels can run here; otherwise why not.");

  m.def(
      "cuda_synchronize",
      []() {
#if defined(EPROJ_WITH_CUDA)
        nb::gil_scoped_release release;
        const cudaError_t status = cudaDeviceSynchronize();
        if (status != cudaSuccess)
          throw std::runtime_error(std::string("eproj CUDA: cudaDeviceSynchronize failed: ") +
                                   cudaGetErrorString(status));
#else
        throw std::logic_error("eproj kernels: built without CUDA");
#endif
      },
      "Wait for all work on the current device (for callers whose library runs on a stream of its own).");

  m.def(
      "pointer_kind",
      [](std::uintptr_t pointer) -> std::tuple<std::string, int> {
        int device = -1;
#if defined(EPROJ_WITH_CUDA)
        const std::string kind = eproj::cuda_pointer_kind(pointer, &device);
        return {kind, device};
#else
        (void)pointer;
        return {"unknown", device};
#endif
      },
      "pointer"_a, "CUDA's view of a pointer: ('device' | 'managed' | 'host' | 'unregistered', device index).");

  m.def(
      "dlpack_view",
      [](nb::ndarray<> array) -> nb::dict {
        nb::list shape, strides;
        for (size_t i = 0; i < array.ndim(); ++i) {
          shape.append(array.shape(i));
          strides.append(array.stride(i));
        }
        const auto dtype = array.dtype();
        nb::dict view;
        view["pointer"] = reinterpret_cast<std::uintptr_t>(array.data());
        view["shape"] = nb::tuple(shape);
        view["strides"] = nb::tuple(strides);
        view["dtype_code"] = static_cast<int>(dtype.code);
        view["dtype_bits"] = static_cast<int>(dtype.bits);
        view["dtype_lanes"] = static_cast<int>(dtype.lanes);
        view["device_type"] = array.device_type();
        view["device_id"] = array.device_id();
        return view;
      },
      "array"_a, "Pointer, shape, strides (in elements), dtype and device of a DLPack array.");
}
