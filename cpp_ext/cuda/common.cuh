// Helpers shared by the CUDA kernels: error checks, the stream-ordered
// workspace, block reductions.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

// Launches and dynamic shared memory go through these two macros, so that the
// simulated device (cpp_ext/sim, whose cuda_runtime.h defines them) compiles
// these files as C++ and runs them on the CPU in the tests:
//   EPROJ_LAUNCH(kernel, grid, block, shared_bytes, stream)(args...)
//   EPROJ_DYNAMIC_SHARED(float, smem);  // extern __shared__ float smem[];
#if !defined(EPROJ_LAUNCH)
#define EPROJ_LAUNCH(kernel, grid, block, shared_bytes, stream) kernel<<<grid, block, shared_bytes, stream>>>
#define EPROJ_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace eproj {

// A failed call is also recorded as the thread's last error: it is cleared
// here (a sticky one stays), so that the next launch check does not report it
// as its own.
inline void check_cuda(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  const std::string message = std::string("eproj CUDA: ") + what + " failed: " + cudaGetErrorString(status);
  cudaGetLastError();
  throw std::runtime_error(message);
}

// Launch errors surface at the next call: check right after every launch.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// Scratch memory from the stream-ordered allocator: allocated and freed on the
// caller's stream, so it is safe across streams and capturable in CUDA graphs.
template <typename T>
class StreamBuffer {
 public:
  StreamBuffer(std::size_t count, cudaStream_t stream) : stream_(stream) {
    check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&data_), count * sizeof(T), stream), "cudaMallocAsync");
  }
  ~StreamBuffer() { cudaFreeAsync(data_, stream_); }
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;
  T* get() const { return data_; }

 private:
  T* data_ = nullptr;
  cudaStream_t stream_;
};

inline int multiprocessor_count() {
  int device = 0, count = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return count;
}

constexpr std::int64_t kMaxGridY = 65535;  // grid.y / grid.z limit: images are launched in slices of this size

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over the block (blockDim.x * blockDim.y a multiple of 32, at most 1024);
// the result is valid in thread 0. `shared` holds 32 values.
template <typename T>
__device__ T block_sum(T v, T* shared) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int warps = (blockDim.x * blockDim.y) / 32;
  v = warp_sum(v);
  __syncthreads();  // `shared` may still be read from a previous reduction
  if (tid % 32 == 0) shared[tid / 32] = v;
  __syncthreads();
  v = tid < warps ? shared[tid] : T(0);
  if (tid < 32) v = warp_sum(v);
  return v;
}

__device__ __forceinline__ float block_max(float v, float* shared) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int warps = (blockDim.x * blockDim.y) / 32;
  v = warp_max(v);
  __syncthreads();
  if (tid % 32 == 0) shared[tid / 32] = v;
  __syncthreads();
  v = tid < warps ? shared[tid] : -INFINITY;
  if (tid < 32) v = warp_max(v);
  return v;
}

}  // namespace eproj
