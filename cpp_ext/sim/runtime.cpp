// The runtime calls of the simulated device: errors, device queries,
// streams, function attributes and the launch checks (memory: memory.cpp).
//
// Error rules, as CUDA documents them: every failing call records its error
// for cudaGetLastError, which returns it once and resets it
// (cudaPeekAtLastError keeps it). A launch with a bad configuration records
// its error and does not run. An error while a grid runs (scheduler.cpp's
// execution-model checks, a write past an allocation) is sticky: from then on
// the calls that use the device return it, cudaGetLastError included, until
// the test harness clears it (clear_sticky_error).
#include <cstdio>
#include <map>
#include <mutex>
#include <set>
#include <string>

#include "device.h"
#include "runtime_control.h"

#if !defined(EPROJ_SIM_CUDA_RUNTIME_H)
#error "the simulated device must be compiled against cpp_ext/sim/cuda_runtime.h"
#endif

struct CUstream_st {
  int id;
};

namespace eproj::sim {

namespace {

struct Runtime {
  std::mutex launch_lock;                             // one grid at a time
  std::mutex state_lock;
  std::set<cudaStream_t> streams;
  std::map<const void*, int> max_dynamic_shared;      // cudaFuncSetAttribute
  cudaError_t sticky = cudaSuccess;
  std::string sticky_message;
  int next_stream = 1;
};

Runtime& runtime() {
  static Runtime r;
  return r;
}

thread_local cudaError_t last_error = cudaSuccess;
thread_local std::map<int, std::string> described;  // code -> description of its latest occurrence here

const char* plain_description(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unrecognized error code";
}

bool known_stream(cudaStream_t stream) {
  if (stream == nullptr || stream == cudaStreamLegacy || stream == cudaStreamPerThread) return true;
  Runtime& r = runtime();
  std::lock_guard<std::mutex> lock(r.state_lock);
  return r.streams.count(stream) > 0;
}

}  // namespace

cudaError_t fail(cudaError_t error, const std::string& what) {
  last_error = error;
  described[error] = std::string(plain_description(error)) + "; simulated device: " + what;
  return error;
}

cudaError_t sticky_error() {
  Runtime& r = runtime();
  std::lock_guard<std::mutex> lock(r.state_lock);
  if (r.sticky != cudaSuccess) {
    last_error = r.sticky;
    described[r.sticky] = std::string(plain_description(r.sticky)) + "; simulated device: " + r.sticky_message;
  }
  return r.sticky;
}

void set_sticky(cudaError_t error, const std::string& what) {
  Runtime& r = runtime();
  {
    std::lock_guard<std::mutex> lock(r.state_lock);
    r.sticky = error;
    r.sticky_message = what;
  }
  fail(error, what);
}

std::string address(const void* pointer) {
  char text[32];
  std::snprintf(text, sizeof text, "0x%llx", static_cast<unsigned long long>(reinterpret_cast<std::uintptr_t>(pointer)));
  return text;
}

cudaError_t check_stream(cudaStream_t stream, const char* call) {
  if (known_stream(stream)) return cudaSuccess;
  return fail(cudaErrorInvalidResourceHandle, std::string(call) + ": stream " + address(stream) +
                                                  " is neither 0, cudaStreamLegacy, cudaStreamPerThread nor a "
                                                  "stream from cudaStreamCreate");
}

// ---------------------------------------------------------------------------
// what the harness (sim_bindings.cpp) needs beyond the runtime API
// ---------------------------------------------------------------------------

void clear_sticky_error() {
  Runtime& r = runtime();
  std::lock_guard<std::mutex> lock(r.state_lock);
  r.sticky = cudaSuccess;
  r.sticky_message.clear();
  last_error = cudaSuccess;
}

// ---------------------------------------------------------------------------
// launches
// ---------------------------------------------------------------------------

void launch(const LaunchConfig& config, void (*body)(void*), void* context) {
  if (sticky_error()) return;
  const dim3 b = config.block, g = config.grid;
  const auto text = [](dim3 v) {
    return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
  };
  const std::uint64_t threads = static_cast<std::uint64_t>(b.x) * b.y * b.z;
  const std::string who = std::string("launch of ") + config.name;
  if (b.x == 0 || b.y == 0 || b.z == 0 || b.x > kMaxBlockDim[0] || b.y > kMaxBlockDim[1] || b.z > kMaxBlockDim[2]) {
    fail(cudaErrorInvalidConfiguration, who + ": block " + text(b) + " outside the limits (1..1024, 1..1024, 1..64)");
    return;
  }
  if (threads > kMaxThreadsPerBlock) {
    fail(cudaErrorInvalidConfiguration, who + ": block " + text(b) + " has " + std::to_string(threads) +
                                            " threads; at most 1024");
    return;
  }
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > kMaxGridDim[0] || g.y > kMaxGridDim[1] || g.z > kMaxGridDim[2]) {
    fail(cudaErrorInvalidConfiguration, who + ": grid " + text(g) + " outside the limits (1..2147483647, 1..65535, "
                                              "1..65535)");
    return;
  }
  if (check_stream(config.stream, who.c_str()) != cudaSuccess) return;
  std::size_t limit = kDefaultDynamicShared;
  bool raised = false;
  {
    Runtime& r = runtime();
    std::lock_guard<std::mutex> lock(r.state_lock);
    auto it = r.max_dynamic_shared.find(config.kernel);
    if (it != r.max_dynamic_shared.end()) {
      limit = static_cast<std::size_t>(it->second);
      raised = true;
    }
  }
  if (config.shared_bytes > limit) {
    fail(cudaErrorInvalidValue,
         who + ": " + std::to_string(config.shared_bytes) + " bytes of dynamic shared memory asked for, at most " +
             std::to_string(limit) + (raised ? " (as cudaFuncSetAttribute set it)"
                                             : " without cudaFuncSetAttribute(kernel, "
                                               "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)"));
    return;
  }
  std::string error;
  bool ok;
  {
    std::lock_guard<std::mutex> lock(runtime().launch_lock);
    ok = run_grid(config, body, context, &error);
  }
  if (!ok) {
    set_sticky(cudaErrorLaunchFailure, error);
    return;
  }
  const std::string overrun = broken_redzone();
  if (!overrun.empty()) set_sticky(cudaErrorIllegalAddress, "launch of " + std::string(config.name) + ": " + overrun);
}

}  // namespace eproj::sim

using eproj::sim::fail;

// ---------------------------------------------------------------------------
// errors
// ---------------------------------------------------------------------------

cudaError_t cudaGetLastError() {
  if (cudaError_t e = eproj::sim::sticky_error()) return e;
  const cudaError_t e = eproj::sim::last_error;
  eproj::sim::last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() {
  if (cudaError_t e = eproj::sim::sticky_error()) return e;
  return eproj::sim::last_error;
}

const char* cudaGetErrorString(cudaError_t error) {
  auto it = eproj::sim::described.find(error);
  return it != eproj::sim::described.end() ? it->second.c_str() : eproj::sim::plain_description(error);
}

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

// ---------------------------------------------------------------------------
// the device
// ---------------------------------------------------------------------------

cudaError_t cudaGetDeviceCount(int* count) {
  if (count == nullptr) return fail(cudaErrorInvalidValue, "cudaGetDeviceCount: null pointer");
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  if (device == nullptr) return fail(cudaErrorInvalidValue, "cudaGetDevice: null pointer");
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device != 0)
    return fail(cudaErrorInvalidDevice, "cudaSetDevice: device " + std::to_string(device) +
                                            " asked for; the simulated machine has device 0 only");
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  using namespace eproj::sim;
  if (value == nullptr) return fail(cudaErrorInvalidValue, "cudaDeviceGetAttribute: null pointer");
  if (device != 0)
    return fail(cudaErrorInvalidDevice, "cudaDeviceGetAttribute: device " + std::to_string(device) +
                                            "; the simulated machine has device 0 only");
  switch (attribute) {
    case cudaDevAttrMaxThreadsPerBlock: *value = static_cast<int>(kMaxThreadsPerBlock); break;
    case cudaDevAttrMaxBlockDimX: *value = static_cast<int>(kMaxBlockDim[0]); break;
    case cudaDevAttrMaxBlockDimY: *value = static_cast<int>(kMaxBlockDim[1]); break;
    case cudaDevAttrMaxBlockDimZ: *value = static_cast<int>(kMaxBlockDim[2]); break;
    case cudaDevAttrMaxGridDimX: *value = static_cast<int>(kMaxGridDim[0]); break;
    case cudaDevAttrMaxGridDimY: *value = static_cast<int>(kMaxGridDim[1]); break;
    case cudaDevAttrMaxGridDimZ: *value = static_cast<int>(kMaxGridDim[2]); break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(kDefaultDynamicShared); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(kMaxDynamicSharedOptin); break;
    case cudaDevAttrWarpSize: *value = kWarpSize; break;
    case cudaDevAttrMultiProcessorCount: *value = kMultiprocessors; break;
    case cudaDevAttrComputeCapabilityMajor: *value = kComputeMajor; break;
    case cudaDevAttrComputeCapabilityMinor: *value = kComputeMinor; break;
    default:
      return fail(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute " + std::to_string(attribute) +
                                             " is not simulated");
  }
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() { return eproj::sim::sticky_error(); }

cudaError_t cudaFuncSetAttribute(const void* function, cudaFuncAttribute attribute, int value) {
  using namespace eproj::sim;
  if (function == nullptr) return fail(cudaErrorInvalidDeviceFunction, "cudaFuncSetAttribute: null function");
  if (cudaError_t e = sticky_error()) return e;
  if (attribute == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<std::size_t>(value) > kMaxDynamicSharedOptin)
      return fail(cudaErrorInvalidValue, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize): " +
                                             std::to_string(value) + " bytes; the device allows 0.." +
                                             std::to_string(kMaxDynamicSharedOptin));
    Runtime& r = runtime();
    std::lock_guard<std::mutex> lock(r.state_lock);
    r.max_dynamic_shared[function] = value;
    return cudaSuccess;
  }
  if (attribute == cudaFuncAttributePreferredSharedMemoryCarveout) {
    if (value < -1 || value > 100)
      return fail(cudaErrorInvalidValue, "cudaFuncSetAttribute(PreferredSharedMemoryCarveout): " +
                                             std::to_string(value) + "; expected -1..100");
    return cudaSuccess;
  }
  return fail(cudaErrorInvalidValue, "cudaFuncSetAttribute: attribute " + std::to_string(attribute) +
                                         " is not simulated");
}

// ---------------------------------------------------------------------------
// streams
// ---------------------------------------------------------------------------

cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  using namespace eproj::sim;
  if (stream == nullptr) return fail(cudaErrorInvalidValue, "cudaStreamCreate: null pointer");
  if (cudaError_t e = sticky_error()) return e;
  Runtime& r = runtime();
  std::lock_guard<std::mutex> lock(r.state_lock);
  *stream = new CUstream_st{r.next_stream++};
  r.streams.insert(*stream);
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  using namespace eproj::sim;
  Runtime& r = runtime();
  {
    std::lock_guard<std::mutex> lock(r.state_lock);
    if (r.streams.erase(stream) == 1) {
      delete stream;
      return cudaSuccess;
    }
  }
  return fail(cudaErrorInvalidResourceHandle, "cudaStreamDestroy: " + address(stream) +
                                                  " is not a stream from cudaStreamCreate");
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  if (cudaError_t e = eproj::sim::check_stream(stream, "cudaStreamSynchronize")) return e;
  return eproj::sim::sticky_error();  // the stream's work ran when it was launched
}
