// The simulated CUDA device: a stand-in for <cuda_runtime.h> with which the
// kernels of cpp_ext/cuda/*.cu compile with a C++ compiler and run on the CPU.
// Test infrastructure of eproj (the module eproj.cpp_ext._kernels_sim), not
// shipped to users. cpp_ext/README.md says what it proves and what it does not.
//
// Execution model (scheduler.cpp): the blocks of a launch run one after
// another; every thread of a block is a fiber of its own. __syncthreads()
// releases when every live thread of the block waits at the same call site; a
// barrier that part of the block reaches (the rest exited or waits elsewhere),
// a shuffle whose mask names a lane that exited or never comes, and a deadlock
// fail the launch. Dynamic shared memory is filled with NaN bytes before each
// block. The runtime calls (runtime.cpp) keep CUDA's error rules: launch
// configuration errors are returned once by cudaGetLastError, execution errors
// are sticky.
#pragma once

#define EPROJ_SIM_CUDA_RUNTIME_H 1

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------
// Qualifiers. A static __shared__ array is one object for the whole launch:
// blocks run one after another and launches one at a time, so the threads of
// the running block are its only users, as on a device.
// ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __constant__ static

// ---------------------------------------------------------------------------
// Vector types
// ---------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

// Device min/max of CUDA's math library, for any pair of arithmetic types.
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using T = std::common_type_t<A, B>;
  return static_cast<T>(a) < static_cast<T>(b) ? static_cast<T>(a) : static_cast<T>(b);
}
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using T = std::common_type_t<A, B>;
  return static_cast<T>(a) < static_cast<T>(b) ? static_cast<T>(b) : static_cast<T>(a);
}

// ---------------------------------------------------------------------------
// Runtime API: the subset the kernels, the bindings and the tests use
// ---------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
};

enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

enum cudaMemoryType : int {
  cudaMemoryTypeUnregistered = 0,
  cudaMemoryTypeHost = 1,
  cudaMemoryTypeDevice = 2,
  cudaMemoryTypeManaged = 3,
};

struct cudaPointerAttributes {
  cudaMemoryType type;
  int device;
  void* devicePointer;
  void* hostPointer;
};

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxBlockDimY = 3,
  cudaDevAttrMaxBlockDimZ = 4,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

struct CUstream_st;  // a stream made by cudaStreamCreate
using cudaStream_t = CUstream_st*;
#define cudaStreamLegacy (reinterpret_cast<cudaStream_t>(0x1))
#define cudaStreamPerThread (reinterpret_cast<cudaStream_t>(0x2))

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
// The documented description; for the latest error of a code this thread saw,
// followed by "; simulated device: " and what went wrong (valid until the
// next error of that code on this thread).
const char* cudaGetErrorString(cudaError_t error);
const char* cudaGetErrorName(cudaError_t error);

cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device);
cudaError_t cudaDeviceSynchronize();

cudaError_t cudaMalloc(void** pointer, std::size_t bytes);
cudaError_t cudaFree(void* pointer);
cudaError_t cudaMallocAsync(void** pointer, std::size_t bytes, cudaStream_t stream);
cudaError_t cudaFreeAsync(void* pointer, cudaStream_t stream);
cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);
cudaError_t cudaMemset(void* pointer, int value, std::size_t bytes);
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, const void* pointer);

cudaError_t cudaStreamCreate(cudaStream_t* stream);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);

cudaError_t cudaFuncSetAttribute(const void* function, cudaFuncAttribute attribute, int value);
template <typename F>
cudaError_t cudaFuncSetAttribute(F* function, cudaFuncAttribute attribute, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(function), attribute, value);
}

// ---------------------------------------------------------------------------
// Device side: built-in variables, barriers, warp shuffles
// ---------------------------------------------------------------------------
namespace eproj::sim {

// Where a barrier or a shuffle is called from.
struct Site {
  const char* file;
  int line;
};

// The running thread's coordinates; the scheduler sets them before it
// switches to a thread.
struct ThreadCoordinates {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern ThreadCoordinates current;

void syncthreads(Site site);
void syncwarp(Site site, unsigned int mask = 0xffffffffu);
void* dynamic_shared_memory();

enum class ShuffleKind : int { kIndex, kUp, kDown, kXor, kSync };
// Waits until every lane of `mask` has arrived at this call site; returns the
// bits of the source lane's `value` (at most 8 bytes).
std::uint64_t shuffle_bits(Site site, ShuffleKind kind, unsigned int mask, std::uint64_t value, int lane_arg,
                           int width);

template <typename T>
T shuffle(Site site, ShuffleKind kind, unsigned int mask, T value, int lane_arg, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move values of at most 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shuffle_bits(site, kind, mask, bits, lane_arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace eproj::sim

#define threadIdx (static_cast<const uint3&>(::eproj::sim::current.thread_idx))
#define blockIdx (static_cast<const uint3&>(::eproj::sim::current.block_idx))
#define blockDim (static_cast<const dim3&>(::eproj::sim::current.block_dim))
#define gridDim (static_cast<const dim3&>(::eproj::sim::current.grid_dim))
#define warpSize 32

#define EPROJ_SIM_SITE (::eproj::sim::Site{__FILE__, __LINE__})
#define __syncthreads() ::eproj::sim::syncthreads(EPROJ_SIM_SITE)
#define __syncwarp(...) ::eproj::sim::syncwarp(EPROJ_SIM_SITE, ##__VA_ARGS__)
#define __shfl_sync(...) ::eproj::sim::shuffle(EPROJ_SIM_SITE, ::eproj::sim::ShuffleKind::kIndex, __VA_ARGS__)
#define __shfl_up_sync(...) ::eproj::sim::shuffle(EPROJ_SIM_SITE, ::eproj::sim::ShuffleKind::kUp, __VA_ARGS__)
#define __shfl_down_sync(...) ::eproj::sim::shuffle(EPROJ_SIM_SITE, ::eproj::sim::ShuffleKind::kDown, __VA_ARGS__)
#define __shfl_xor_sync(...) ::eproj::sim::shuffle(EPROJ_SIM_SITE, ::eproj::sim::ShuffleKind::kXor, __VA_ARGS__)

// ---------------------------------------------------------------------------
// Launches: EPROJ_LAUNCH(kernel, grid, block, shared_bytes, stream)(args...)
// is kernel<<<grid, block, shared_bytes, stream>>>(args...) under nvcc
// (cpp_ext/cuda/common.cuh); here it runs the grid before it returns, a legal
// order of a stream's work.
// ---------------------------------------------------------------------------
namespace eproj::sim {

struct LaunchConfig {
  const void* kernel;  // the function, for its cudaFuncSetAttribute settings
  const char* name;
  dim3 grid, block;
  std::size_t shared_bytes;
  cudaStream_t stream;
};

// Checks the configuration (the error goes to cudaGetLastError and the grid
// does not run, as on a device), then runs `body(context)` once per thread.
void launch(const LaunchConfig& config, void (*body)(void*), void* context);

template <typename... Params>
class Launch {
 public:
  Launch(void (*kernel)(Params...), const char* name, dim3 grid, dim3 block, std::size_t shared_bytes,
         cudaStream_t stream)
      : kernel_(kernel), config_{reinterpret_cast<const void*>(kernel), name, grid, block, shared_bytes, stream} {}

  // The arguments are converted to the parameter types once, as a launch
  // does; every thread gets its own copy.
  template <typename... Args>
  void operator()(Args&&... args) const {
    struct Context {
      void (*kernel)(Params...);
      std::tuple<std::decay_t<Params>...> params;
    } context{kernel_, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    launch(config_, [](void* c) {
      auto* ctx = static_cast<Context*>(c);
      std::apply(ctx->kernel, ctx->params);
    }, &context);
  }

 private:
  void (*kernel_)(Params...);
  LaunchConfig config_;
};

template <typename... Params>
Launch<Params...> make_launch(void (*kernel)(Params...), const char* name, dim3 grid, dim3 block,
                              std::size_t shared_bytes, cudaStream_t stream) {
  return Launch<Params...>(kernel, name, grid, block, shared_bytes, stream);
}

}  // namespace eproj::sim

#define EPROJ_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  ::eproj::sim::make_launch(kernel, #kernel, grid, block, shared_bytes, stream)
#define EPROJ_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::eproj::sim::dynamic_shared_memory())
