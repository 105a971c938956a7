// The stop check on CUDA: one thread per sample, on the caller's stream, so
// that the flags never leave the device inside the projection loop.
#include "common.cuh"
#include "eproj/kernels.h"

namespace eproj {

namespace {

__global__ void stop_kernel(StopParams p, StopBuffers b) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < b.n) stop_sample(p, b, i);
}

}  // namespace

void stop_check_cuda(const StopParams& p, const StopBuffers& b, std::uintptr_t stream_handle) {
  if (b.n == 0) return;
  constexpr int kThreads = 128;
  const auto blocks = static_cast<unsigned>((b.n + kThreads - 1) / kThreads);
  EPROJ_LAUNCH(stop_kernel, blocks, kThreads, 0, reinterpret_cast<cudaStream_t>(stream_handle))(p, b);
  check_launch("stop_kernel");
}

}  // namespace eproj
