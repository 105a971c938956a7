// Kernels that exercise the simulated device itself (tests/cpp_ext/test_cuda_sim.py):
// each one either follows CUDA's rules and has a known result, or breaks one
// rule on purpose so that the test sees the launch fail. Written as CUDA, like
// cuda/*.cu; every kernel takes (out, arg).
#include "selftest.h"

#include <map>

#include "../cuda/common.cuh"

namespace eproj::sim {

namespace {

__device__ int thread_rank() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
__device__ int block_rank() { return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z); }
__device__ int block_threads() { return blockDim.x * blockDim.y * blockDim.z; }

// out[global thread] = its global rank: every thread of every block ran once.
__global__ void thread_rank_kernel(float* out, int) {
  out[block_rank() * block_threads() + thread_rank()] = static_cast<float>(block_rank() * block_threads() + thread_rank());
}

// threads from `arg` on return before the barrier: a partial barrier.
__global__ void partial_barrier_kernel(float* out, int arg) {
  if (thread_rank() >= arg) return;
  __syncthreads();
  out[thread_rank()] = 1.0f;
}

// odd and even threads wait at two different barriers.
__global__ void split_barrier_kernel(float* out, int) {
  if (thread_rank() % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[thread_rank()] = 1.0f;
}

// lane `arg` of every warp returns before a full-mask shuffle.
__global__ void shuffle_lane_exits_kernel(float* out, int arg) {
  if (thread_rank() % 32 == arg) return;
  out[thread_rank()] = __shfl_down_sync(0xffffffffu, static_cast<float>(thread_rank()), 1);
}

// lane `arg` waits at a barrier while the rest of its warp waits at a shuffle: a deadlock.
__global__ void shuffle_against_barrier_kernel(float* out, int arg) {
  if (thread_rank() % 32 == arg) {
    __syncthreads();
  } else {
    out[thread_rank()] = __shfl_down_sync(0xffffffffu, static_cast<float>(thread_rank()), 1);
  }
}

// The four shuffles with width `arg`: out[4 t + k] for down 3, up 2, xor 5, index lane + 1.
__global__ void shuffles_kernel(float* out, int arg) {
  const int t = thread_rank();
  const float v = static_cast<float>(t);
  out[4 * t + 0] = __shfl_down_sync(0xffffffffu, v, 3, arg);
  out[4 * t + 1] = __shfl_up_sync(0xffffffffu, v, 2, arg);
  out[4 * t + 2] = __shfl_xor_sync(0xffffffffu, v, 5, arg);
  out[4 * t + 3] = __shfl_sync(0xffffffffu, v, t % 32 + 1, arg);
}

// Lanes 0-15 shuffle down by one with mask 0x0000ffff and width `arg`: with
// width 16 every source lane is in the mask; with 32 lane 15 reads lane 16.
__global__ void half_warp_shuffle_kernel(float* out, int arg) {
  const int t = thread_rank();
  if (t % 32 < 16) out[t] = __shfl_down_sync(0x0000ffffu, static_cast<float>(t), 1, arg);
}

// Reads dynamic shared memory before any thread wrote it, then writes it.
__global__ void read_shared_kernel(float* out, int) {
  EPROJ_DYNAMIC_SHARED(float, smem);
  out[block_rank() * block_threads() + thread_rank()] = smem[thread_rank()];
  smem[thread_rank()] = 1.0f;
}

// Each thread writes its rank to shared memory and reads a neighbour's
// (arg & 2: the lower one, else the upper one), across a barrier when arg & 1.
__global__ void neighbour_kernel(float* out, int arg) {
  EPROJ_DYNAMIC_SHARED(float, smem);
  const int t = thread_rank(), n = block_threads();
  smem[t] = static_cast<float>(t);
  if (arg & 1) __syncthreads();
  const int other = (arg & 2) ? (t > 0 ? t - 1 : 0) : (t + 1 < n ? t + 1 : t);
  out[block_rank() * n + t] = smem[other];
}

// Lanes swap values with their neighbour (lane ^ 1) through shared memory,
// across __syncwarp() when arg is 1; with arg 2 lane 3 leaves the warp first.
__global__ void warp_exchange_kernel(float* out, int arg) {
  EPROJ_DYNAMIC_SHARED(float, smem);
  const int t = thread_rank();
  if (arg == 2 && t % 32 == 3) return;
  smem[t] = static_cast<float>(t);
  if (arg != 0) __syncwarp();
  out[t] = smem[t ^ 1];
}

// Thread 0 writes out[arg]: past the end when out holds arg floats.
__global__ void write_at_kernel(float* out, int arg) {
  if (thread_rank() == 0) out[arg] = 1.0f;
}

// Writes smem[arg]: past the end of arg floats of dynamic shared memory.
__global__ void shared_write_at_kernel(float*, int arg) {
  EPROJ_DYNAMIC_SHARED(float, smem);
  if (thread_rank() == 0) smem[arg] = 1.0f;
}

// Fills the first `arg` floats of dynamic shared memory and sums them into out[0].
__global__ void large_shared_kernel(float* out, int arg) {
  EPROJ_DYNAMIC_SHARED(float, smem);
  for (int k = thread_rank(); k < arg; k += block_threads()) smem[k] = 1.0f;
  __syncthreads();
  if (thread_rank() == 0) {
    float total = 0.0f;
    for (int k = 0; k < arg; ++k) total += smem[k];
    out[0] = total;
  }
}

// eproj::block_sum of thread rank + 1 per block: out[block] = n (n + 1) / 2.
__global__ void block_sum_kernel(float* out, int) {
  __shared__ float shared[32];
  const float total = eproj::block_sum(static_cast<float>(thread_rank() + 1), shared);
  if (thread_rank() == 0) out[block_rank()] = total;
}

// eproj::block_max of the thread rank, and block_sum twice in a row (the
// shared scratch reused): out[2 block] = n - 1, out[2 block + 1] = 2 n.
__global__ void block_max_kernel(float* out, int) {
  __shared__ float shared[32];
  const float m = eproj::block_max(static_cast<float>(thread_rank()), shared);
  const float a = eproj::block_sum(1.0f, shared);
  const float b = eproj::block_sum(1.0f, shared);
  if (thread_rank() == 0) {
    out[2 * block_rank()] = m;
    out[2 * block_rank() + 1] = a + b;
  }
}

using Kernel = void (*)(float*, int);

const std::map<std::string, Kernel>& kernels() {
  static const std::map<std::string, Kernel> table = {
      {"thread_rank", thread_rank_kernel},
      {"partial_barrier", partial_barrier_kernel},
      {"split_barrier", split_barrier_kernel},
      {"shuffle_lane_exits", shuffle_lane_exits_kernel},
      {"shuffle_against_barrier", shuffle_against_barrier_kernel},
      {"shuffles", shuffles_kernel},
      {"half_warp_shuffle", half_warp_shuffle_kernel},
      {"read_shared", read_shared_kernel},
      {"neighbour", neighbour_kernel},
      {"warp_exchange", warp_exchange_kernel},
      {"write_at", write_at_kernel},
      {"shared_write_at", shared_write_at_kernel},
      {"large_shared", large_shared_kernel},
      {"block_sum", block_sum_kernel},
      {"block_max", block_max_kernel},
  };
  return table;
}

Kernel find(const std::string& name) {
  auto it = kernels().find(name);
  if (it == kernels().end()) {
    std::string known;
    for (const auto& [k, _] : kernels()) known += (known.empty() ? "" : ", ") + k;
    throw std::invalid_argument("simulated device: no self-test kernel '" + name + "'; expected one of " + known);
  }
  return it->second;
}

}  // namespace

cudaError_t launch_selftest(const std::string& name, dim3 grid, dim3 block, std::size_t shared_bytes, float* out,
                            int arg, cudaStream_t stream) {
  const Kernel kernel = find(name);
  EPROJ_LAUNCH(kernel, grid, block, shared_bytes, stream)(out, arg);
  return cudaGetLastError();
}

cudaError_t set_selftest_max_dynamic_shared(const std::string& name, int bytes) {
  return cudaFuncSetAttribute(find(name), cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

}  // namespace eproj::sim
