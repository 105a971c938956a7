// The fused DSSIM map on the CPU.
//
// Work is split into (image, tile of output rows x columns) tasks run by
// OpenMP; tiles are small enough that a task's scratch stays in cache. For
// each channel a task
//   1) mirrors the part of each input row it needs (tile plus the window's
//      halo) into a padded row buffer,
//   2) horizontal pass: row_moments for every tile column, into five planes,
//   3) vertical pass: window_dssim for every output pixel, summed over channels.
// Then it writes the channel mean, the mask, and its share of the per-image
// max and sum. Inner loops run over columns with `omp simd` and the window
// fixed at compile time, so the shared per-pixel functions vectorise across
// pixels.
//
// This file is compiled twice on x86-64: as is (SSE2, any x86-64 CPU) and, from
// dssim_avx2.cpp, for AVX2 (8 floats per instruction). dssim_map_cpu picks the
// AVX2 variant at run time when the CPU has it; both compute the same bits,
// since each vector lane does the same operations in the same order and
// neither variant contracts multiply-adds.
#include <algorithm>
#include <cstdlib>
#include <limits>
#include <vector>

#include "eproj/kernels.h"

#if defined(EPROJ_CPU_VARIANT_AVX2)
#define EPROJ_CPU_VARIANT avx2
#else
#define EPROJ_CPU_VARIANT baseline
#endif

namespace eproj {
namespace EPROJ_CPU_VARIANT {

namespace {

constexpr std::int64_t kTileCols = 256;
constexpr std::int64_t kParallelPixels = 1 << 12;  // below this, waking threads costs more than it saves

struct Tile {
  std::int64_t image, row0, row1, col0, col1;
};

struct TileStats {
  float max = -std::numeric_limits<float>::infinity();
  double sum = 0.0;
};

struct Scratch {
  std::vector<float> row_x, row_y;           // one padded input row segment
  std::vector<float> mx, my, cxx, cyy, cxy;  // horizontal moments, (tile rows + halo) x tile cols
  std::vector<float> total;                  // dssim summed over channels, tile rows x tile cols

  Scratch(std::int64_t rows, std::int64_t cols, std::int64_t radius) {
    const auto padded = static_cast<std::size_t>(cols + 2 * radius);
    const auto plane = static_cast<std::size_t>((rows + 2 * radius) * cols);
    row_x.resize(padded);
    row_y.resize(padded);
    for (auto* p : {&mx, &my, &cxx, &cyy, &cxy}) p->resize(plane);
    total.resize(static_cast<std::size_t>(rows * cols));
  }
};

// Rows per tile: 32, fewer when that would leave threads idle.
std::int64_t tile_rows(std::int64_t tasks_per_row_band, std::int64_t h) {
  const std::int64_t want_tasks = 4 * static_cast<std::int64_t>(cpu_threads());
  std::int64_t rows = 32;
  while (rows > 8 && tasks_per_row_band * ((h + rows - 1) / rows) < want_tasks) rows /= 2;
  return std::min(rows, std::max<std::int64_t>(h, 1));
}

// Columns [first, first + count) of one row of x and y, mirrored where they
// fall outside [0, w).
void mirrored_segment(const float* xr, const float* yr, std::int64_t w, std::int64_t first, std::int64_t count,
                      float* rx, float* ry) {
  std::int64_t j = 0;
  for (; j < count && first + j < 0; ++j) {
    rx[j] = xr[reflect_index(first + j, w)];
    ry[j] = yr[reflect_index(first + j, w)];
  }
  const std::int64_t inside_end = std::min(count, w - first);
  if (inside_end > j) {
    std::copy(xr + first + j, xr + first + inside_end, rx + j);
    std::copy(yr + first + j, yr + first + inside_end, ry + j);
    j = inside_end;
  }
  for (; j < count; ++j) {
    rx[j] = xr[reflect_index(first + j, w)];
    ry[j] = yr[reflect_index(first + j, w)];
  }
}

template <int kWindow>
TileStats dssim_tile(const DssimParams& p, const DssimBuffers& b, const Tile& t, Scratch& s) {
  const std::int64_t w = b.w, h = b.h, radius = p.window / 2;
  const std::int64_t rows = t.row1 - t.row0, cols = t.col1 - t.col0;
  std::fill(s.total.begin(), s.total.begin() + rows * cols, 0.0f);
  float* rx = s.row_x.data();
  float* ry = s.row_y.data();

  for (std::int64_t ch = 0; ch < b.c; ++ch) {
    const float* x = b.x + (t.image * b.c + ch) * h * w;
    const float* y = b.y + (t.image * b.c + ch) * h * w;

    // 1) + 2) mirrored row segments, horizontal moments
    for (std::int64_t r = 0; r < rows + 2 * radius; ++r) {
      const std::int64_t src = reflect_index(t.row0 - radius + r, h);
      const float* xr = x + src * w;
      const float* yr = y + src * w;
      mirrored_segment(xr, yr, w, t.col0 - radius, cols + 2 * radius, rx, ry);
      float* mx = s.mx.data() + r * cols;
      float* my = s.my.data() + r * cols;
      float* cxx = s.cxx.data() + r * cols;
      float* cyy = s.cyy.data() + r * cols;
      float* cxy = s.cxy.data() + r * cols;
#pragma omp simd
      for (std::int64_t j = 0; j < cols; ++j) {
        const RowMoments m = row_moments<kWindow>(p, rx + j, ry + j);
        mx[j] = m.mx;
        my[j] = m.my;
        cxx[j] = m.cxx;
        cyy[j] = m.cyy;
        cxy[j] = m.cxy;
      }
    }

    // 3) vertical pass, summed over channels
    for (std::int64_t i = 0; i < rows; ++i) {
      const std::int64_t o = i * cols;
      float* total = s.total.data() + o;
      const float *mx = s.mx.data() + o, *my = s.my.data() + o, *cxx = s.cxx.data() + o,
                  *cyy = s.cyy.data() + o, *cxy = s.cxy.data() + o;
#pragma omp simd
      for (std::int64_t j = 0; j < cols; ++j)
        total[j] += window_dssim<kWindow>(p, mx + j, my + j, cxx + j, cyy + j, cxy + j, cols);
    }
  }

  // channel mean, mask, tile statistics
  TileStats stats;
  const float channels = static_cast<float>(b.c);
  const float threshold = p.threshold;
  for (std::int64_t i = 0; i < rows; ++i) {
    const std::int64_t o = (t.image * h + t.row0 + i) * w + t.col0;
    const float* total = s.total.data() + i * cols;
    float* out = b.out + o;
    float row_max = stats.max, row_sum = 0.0f;
#pragma omp simd reduction(max : row_max) reduction(+ : row_sum)
    for (std::int64_t j = 0; j < cols; ++j) {
      const float d = total[j] / channels;
      out[j] = d;
      row_max = std::max(row_max, d);
      row_sum += d;
    }
    if (b.mask) {
      std::uint8_t* mask = b.mask + o;
#pragma omp simd
      for (std::int64_t j = 0; j < cols; ++j) mask[j] = out[j] > threshold ? 1 : 0;
    }
    stats.max = row_max;
    stats.sum += row_sum;
  }
  return stats;
}

using TileFunction = TileStats (*)(const DssimParams&, const DssimBuffers&, const Tile&, Scratch&);

TileFunction select_tile(int window) {
  switch (window) {
    case 3: return dssim_tile<3>;
    case 5: return dssim_tile<5>;
    case 7: return dssim_tile<7>;
    case 9: return dssim_tile<9>;
    case 11: return dssim_tile<11>;
    case 13: return dssim_tile<13>;
    case 15: return dssim_tile<15>;
    default: return dssim_tile<0>;
  }
}

}  // namespace

void dssim_map(const DssimParams& p, const DssimBuffers& b, int threads);

void dssim_map(const DssimParams& p, const DssimBuffers& b, int threads) {
  const int team = threads > 0 ? threads : cpu_threads();
  if (b.n == 0 || b.h == 0 || b.w == 0) return;
  const std::int64_t cols = std::min(b.w, kTileCols);
  const std::int64_t col_tiles = (b.w + cols - 1) / cols;
  const std::int64_t rows = tile_rows(b.n * col_tiles, b.h);
  const std::int64_t row_tiles = (b.h + rows - 1) / rows;
  const std::int64_t per_image = row_tiles * col_tiles;
  const std::int64_t tasks = b.n * per_image;
  std::vector<TileStats> stats(static_cast<std::size_t>(tasks));
  const TileFunction tile = select_tile(p.window);

#pragma omp parallel num_threads(team) if (team > 1 && b.n * b.c * b.h * b.w >= kParallelPixels)
  {
    Scratch scratch(rows, cols, p.window / 2);
#pragma omp for schedule(static)
    for (std::int64_t k = 0; k < tasks; ++k) {
      const std::int64_t image = k / per_image;
      const std::int64_t row0 = ((k % per_image) / col_tiles) * rows;
      const std::int64_t col0 = (k % col_tiles) * cols;
      const Tile t{image, row0, std::min(b.h, row0 + rows), col0, std::min(b.w, col0 + cols)};
      stats[static_cast<std::size_t>(k)] = tile(p, b, t, scratch);
    }
  }

  if (b.max == nullptr) return;
  for (std::int64_t image = 0; image < b.n; ++image) {
    TileStats total;
    for (std::int64_t k = image * per_image; k < (image + 1) * per_image; ++k) {
      total.max = std::max(total.max, stats[static_cast<std::size_t>(k)].max);
      total.sum += stats[static_cast<std::size_t>(k)].sum;
    }
    b.max[image] = total.max;
    b.mean[image] = static_cast<float>(total.sum / static_cast<double>(b.h * b.w));
  }
}

}  // namespace EPROJ_CPU_VARIANT

#if !defined(EPROJ_CPU_VARIANT_AVX2)
#if defined(EPROJ_HAVE_AVX2_VARIANT)
namespace avx2 {
void dssim_map(const DssimParams& p, const DssimBuffers& b, int threads);
}
#endif

bool cpu_uses_avx2() {
#if defined(EPROJ_HAVE_AVX2_VARIANT)
  const char* off = std::getenv("EPROJ_DISABLE_AVX2");  // for tests: force the baseline variant
  return __builtin_cpu_supports("avx2") && !(off && off[0] == '1');
#else
  return false;
#endif
}

void dssim_map_cpu(const DssimParams& p, const DssimBuffers& b, int threads) {
#if defined(EPROJ_HAVE_AVX2_VARIANT)
  if (cpu_uses_avx2()) return avx2::dssim_map(p, b, threads);
#endif
  baseline::dssim_map(p, b, threads);
}
#endif

}  // namespace eproj
