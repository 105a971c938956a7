// The fused update on CUDA.
//
//   1) update_kernel, grid (blocks per sample, samples): each thread walks
//      pixel positions with a grid stride, loops over channels, applies the
//      step (skipped for inactive samples) and sums |x - x0| before and after;
//      each block writes its two sums to a workspace.
//   2) finish_kernel, one block per sample: adds the block sums in double in a
//      fixed order (deterministic), writes distance and energy and counts the
//      step for active samples.
#include <algorithm>

#include "common.cuh"
#include "eproj/kernels.h"

namespace eproj {

namespace {

constexpr int kThreads = 256;

template <int kWeighting, int kStep>
__global__ void update_kernel(UpdateParams p, UpdateBuffers b, float2* partials) {
  __shared__ float shared[32];
  const std::int64_t sample = blockIdx.y;
  const std::int64_t plane = b.h * b.w;
  const bool active = b.active[sample] != 0;
  const BiasCorrection bc =
      (kStep == kAdam && active) ? bias_correction(p, b.iterations[sample] + 1) : BiasCorrection{1.0f, 1.0f};
  float before = 0.0f, after = 0.0f;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t pos = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; pos < plane;
       pos += stride) {
    float shared_mask = 1.0f;
    if (kWeighting == kMask && b.mask_channels == 1) shared_mask = b.mask[sample * plane + pos];
    for (std::int64_t ch = 0; ch < b.c; ++ch) {
      const std::int64_t i = (sample * b.c + ch) * plane + pos;
      const float xi = b.x[i];
      const float x0i = b.x0[i];
      before += fabsf(xi - x0i);
      if (!active) continue;
      float mask = 1.0f;
      if (kWeighting == kMask) mask = b.mask_channels == 1 ? shared_mask : b.mask[i];
      const float g = weighted_gradient(kWeighting, p.lam, xi, x0i, b.reconstruction[i], b.grad[i], mask);
      const Stepped st =
          stepped_value(kStep, p, bc, xi, g, kStep == kAdam ? b.m[i] : 0.0f, kStep == kAdam ? b.v[i] : 0.0f);
      if (kStep == kAdam) {
        b.m[i] = st.m;
        b.v[i] = st.v;
      }
      const float xn = st.x;
      b.x[i] = xn;
      after += fabsf(xn - x0i);
    }
  }
  if (!active) after = before;
  before = block_sum(before, shared);
  after = block_sum(after, shared);
  if (threadIdx.x == 0) partials[sample * gridDim.x + blockIdx.x] = make_float2(before, after);
}

__global__ void finish_kernel(UpdateParams p, UpdateBuffers b, const float2* partials, int blocks) {
  __shared__ double shared[32];
  const std::int64_t sample = blockIdx.x;
  double before = 0.0, after = 0.0;
  for (int k = threadIdx.x; k < blocks; k += blockDim.x) {
    const float2 part = partials[sample * blocks + k];
    before += part.x;
    after += part.y;
  }
  before = block_sum(before, shared);
  after = block_sum(after, shared);
  if (threadIdx.x == 0) {
    b.distance[sample] = static_cast<float>(after);
    b.energy[sample] = static_cast<float>(static_cast<double>(b.loss[sample]) + static_cast<double>(p.lam) * before);
    if (b.active[sample]) b.iterations[sample] += 1;
  }
}

using Kernel = void (*)(UpdateParams, UpdateBuffers, float2*);

Kernel select_kernel(const UpdateParams& p) {
  const bool adam = p.step == kAdam;
  switch (p.weighting) {
    case kHadamard: return adam ? update_kernel<kHadamard, kAdam> : update_kernel<kHadamard, kPlain>;
    case kMask: return adam ? update_kernel<kMask, kAdam> : update_kernel<kMask, kPlain>;
    default: return adam ? update_kernel<kNone, kAdam> : update_kernel<kNone, kPlain>;
  }
}

// The buffers of images [first, first + count): every per-sample pointer moves.
UpdateBuffers slice(const UpdateBuffers& b, std::int64_t first, std::int64_t count) {
  const std::int64_t image = b.c * b.h * b.w;
  UpdateBuffers s = b;
  s.n = count;
  s.x += first * image;
  s.x0 += first * image;
  s.reconstruction += first * image;
  s.grad += first * image;
  if (s.mask) s.mask += first * b.mask_channels * b.h * b.w;
  if (s.m) s.m += first * image;
  if (s.v) s.v += first * image;
  s.loss += first;
  s.active += first;
  s.iterations += first;
  s.distance += first;
  s.energy += first;
  return s;
}

}  // namespace

void update_cuda(const UpdateParams& p, const UpdateBuffers& b, std::uintptr_t stream_handle) {
  if (b.n == 0) return;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const std::int64_t plane = b.h * b.w;
  // About 16 resident blocks per multiprocessor over the whole batch, at
  // least one per sample, never more than there are pixel positions.
  const std::int64_t wanted = (16 * static_cast<std::int64_t>(multiprocessor_count()) + b.n - 1) / b.n;
  const std::int64_t blocks =
      std::max<std::int64_t>(1, std::min<std::int64_t>(wanted, (plane + kThreads - 1) / kThreads));
  const Kernel kernel = select_kernel(p);
  for (std::int64_t first = 0; first < b.n; first += kMaxGridY) {
    const std::int64_t count = std::min(kMaxGridY, b.n - first);
    const UpdateBuffers s = slice(b, first, count);
    StreamBuffer<float2> partials(static_cast<std::size_t>(count * blocks), stream);
    EPROJ_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(count)), kThreads, 0, stream)(
        p, s, partials.get());
    check_launch("update_kernel");
    EPROJ_LAUNCH(finish_kernel, static_cast<unsigned>(count), kThreads, 0, stream)(p, s, partials.get(),
                                                                                   static_cast<int>(blocks));
    check_launch("finish_kernel");
  }
}

std::string cuda_unavailable_reason() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state for later calls
    return cudaGetErrorString(status);
  }
  if (count == 0) return "no CUDA device";
  return "";
}

std::string cuda_pointer_kind(std::uintptr_t pointer, int* device) {
  cudaPointerAttributes attributes{};
  const cudaError_t status = cudaPointerGetAttributes(&attributes, reinterpret_cast<const void*>(pointer));
  if (status != cudaSuccess) {
    cudaGetLastError();
    return "unregistered";
  }
  *device = attributes.device;
  switch (attributes.type) {
    case cudaMemoryTypeDevice: return "device";
    case cudaMemoryTypeManaged: return "managed";
    case cudaMemoryTypeHost: return "host";
    default: return "unregistered";
  }
}

}  // namespace eproj
