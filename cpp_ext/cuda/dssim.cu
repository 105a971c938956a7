// The fused DSSIM map on CUDA.
//
// One block computes a 32 x 16 tile of output pixels of one image, one thread
// per pixel. For each channel:
//   1) load tile + halo of x and y into shared memory, mirrored at the borders,
//   2) horizontal pass: row_moments for every (halo row, tile column),
//   3) vertical pass: window_dssim per output pixel, summed in a register.
// Then the channel mean goes to `out`, the mask is written, and the block's
// max and sum go to a workspace that stats_kernel reduces per image in a
// fixed order.
#include <algorithm>

#include "common.cuh"
#include "eproj/kernels.h"

namespace eproj {

namespace {

constexpr int kTileW = 32;
constexpr int kTileH = 16;

std::size_t shared_bytes(int radius) {
  const std::size_t in_h = kTileH + 2 * radius, in_w = kTileW + 2 * radius;
  return (2 * in_h * in_w + 5 * in_h * kTileW) * sizeof(float);
}

template <int kWindow>
__global__ void dssim_kernel(DssimParams p, DssimBuffers b, float2* partials) {
  EPROJ_DYNAMIC_SHARED(float, smem);
  __shared__ float reduce_f[32];
  __shared__ double reduce_d[32];
  const int radius = p.window / 2;
  const int in_h = kTileH + 2 * radius, in_w = kTileW + 2 * radius;
  float* sx = smem;
  float* sy = sx + in_h * in_w;
  float* mx = sy + in_h * in_w;
  float* my = mx + in_h * kTileW;
  float* cxx = my + in_h * kTileW;
  float* cyy = cxx + in_h * kTileW;
  float* cxy = cyy + in_h * kTileW;

  const std::int64_t image = blockIdx.z;
  const std::int64_t col0 = static_cast<std::int64_t>(blockIdx.x) * kTileW;
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.y) * kTileH;
  const int tid = threadIdx.y * kTileW + threadIdx.x;
  const int threads = kTileW * kTileH;
  const std::int64_t row = row0 + threadIdx.y, col = col0 + threadIdx.x;
  const bool inside = row < b.h && col < b.w;
  const std::int64_t plane = b.h * b.w;

  float total = 0.0f;
  for (std::int64_t ch = 0; ch < b.c; ++ch) {
    const float* x = b.x + (image * b.c + ch) * plane;
    const float* y = b.y + (image * b.c + ch) * plane;

    // 1) tile + halo. Positions past the image's far edge feed only outputs
    //    outside the image; they are clamped so the mirror stays in range.
    for (int k = tid; k < in_h * in_w; k += threads) {
      const std::int64_t r = min(row0 - radius + k / in_w, b.h + radius - 1);
      const std::int64_t c = min(col0 - radius + k % in_w, b.w + radius - 1);
      const std::int64_t at = reflect_index(r, b.h) * b.w + reflect_index(c, b.w);
      sx[k] = x[at];
      sy[k] = y[at];
    }
    __syncthreads();

    // 2) horizontal pass
    for (int k = tid; k < in_h * kTileW; k += threads) {
      const int r = k / kTileW, c = k % kTileW;
      const RowMoments m = row_moments<kWindow>(p, sx + r * in_w + c, sy + r * in_w + c);
      mx[k] = m.mx;
      my[k] = m.my;
      cxx[k] = m.cxx;
      cyy[k] = m.cyy;
      cxy[k] = m.cxy;
    }
    __syncthreads();

    // 3) vertical pass
    const int at = threadIdx.y * kTileW + threadIdx.x;
    total += window_dssim<kWindow>(p, mx + at, my + at, cxx + at, cyy + at, cxy + at, kTileW);
    __syncthreads();  // the next channel overwrites shared memory
  }

  const float d = total / static_cast<float>(b.c);
  if (inside) {
    const std::int64_t o = image * plane + row * b.w + col;
    b.out[o] = d;
    if (b.mask) b.mask[o] = d > p.threshold ? 1 : 0;
  }
  if (partials) {
    const float block_max_value = block_max(inside ? d : -INFINITY, reduce_f);
    const double block_sum_value = block_sum(inside ? static_cast<double>(d) : 0.0, reduce_d);
    if (tid == 0) {
      const std::int64_t tile = static_cast<std::int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
      partials[image * gridDim.x * gridDim.y + tile] =
          make_float2(block_max_value, static_cast<float>(block_sum_value));
    }
  }
}

__global__ void stats_kernel(DssimBuffers b, const float2* partials, int tiles) {
  __shared__ float reduce_f[32];
  __shared__ double reduce_d[32];
  const std::int64_t image = blockIdx.x;
  float max_value = -INFINITY;
  double sum = 0.0;
  for (int k = threadIdx.x; k < tiles; k += blockDim.x) {
    const float2 part = partials[image * tiles + k];
    max_value = fmaxf(max_value, part.x);
    sum += part.y;
  }
  max_value = block_max(max_value, reduce_f);
  sum = block_sum(sum, reduce_d);
  if (threadIdx.x == 0) {
    b.max[image] = max_value;
    b.mean[image] = static_cast<float>(sum / static_cast<double>(b.h * b.w));
  }
}

using Kernel = void (*)(DssimParams, DssimBuffers, float2*);

Kernel select_kernel(int window) {
  switch (window) {
    case 3: return dssim_kernel<3>;
    case 5: return dssim_kernel<5>;
    case 7: return dssim_kernel<7>;
    case 9: return dssim_kernel<9>;
    case 11: return dssim_kernel<11>;
    case 13: return dssim_kernel<13>;
    case 15: return dssim_kernel<15>;
    default: return dssim_kernel<0>;
  }
}

}  // namespace

void dssim_map_cuda(const DssimParams& p, const DssimBuffers& b, std::uintptr_t stream_handle) {
  if (b.n == 0 || b.h == 0 || b.w == 0) return;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const Kernel kernel = select_kernel(p.window);
  const std::size_t bytes = shared_bytes(p.window / 2);
  if (bytes > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(bytes)),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  const std::int64_t tiles_x = (b.w + kTileW - 1) / kTileW;
  const std::int64_t tiles_y = (b.h + kTileH - 1) / kTileH;
  if (tiles_y > kMaxGridY) throw std::runtime_error("eproj CUDA: image height over 1048560 rows");
  const std::int64_t tiles = tiles_x * tiles_y;
  const std::int64_t plane = b.h * b.w;
  for (std::int64_t first = 0; first < b.n; first += kMaxGridY) {
    const std::int64_t count = std::min(kMaxGridY, b.n - first);
    DssimBuffers s = b;
    s.n = count;
    s.x += first * b.c * plane;
    s.y += first * b.c * plane;
    s.out += first * plane;
    if (s.mask) s.mask += first * plane;
    if (s.max) {
      s.max += first;
      s.mean += first;
    }
    const bool stats = s.max != nullptr;
    StreamBuffer<float2> partials(stats ? static_cast<std::size_t>(count * tiles) : 1, stream);
    EPROJ_LAUNCH(kernel,
                 dim3(static_cast<unsigned>(tiles_x), static_cast<unsigned>(tiles_y), static_cast<unsigned>(count)),
                 dim3(kTileW, kTileH), bytes, stream)(p, s, stats ? partials.get() : nullptr);
    check_launch("dssim_kernel");
    if (stats) {
      EPROJ_LAUNCH(stats_kernel, static_cast<unsigned>(count), 256, 0, stream)(s, partials.get(),
                                                                             static_cast<int>(tiles));
      check_launch("stats_kernel");
    }
  }
}

}  // namespace eproj
