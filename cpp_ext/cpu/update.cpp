// The fused update on the CPU: one pass over the pixels of every sample,
// OpenMP over (sample, chunk) tasks, per-task partial sums reduced in a fixed
// order so results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "eproj/kernels.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace eproj {

int cpu_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

namespace {

constexpr std::int64_t kChunk = 1 << 14;           // pixels per task
constexpr std::int64_t kParallelPixels = 1 << 15;  // below this, waking threads costs more than it saves

struct Partial {
  double before = 0.0;  // sum |x - x0| before the step
  double after = 0.0;   // and after it
};

// One contiguous run of `count` pixels of one sample and channel. Weighting
// and step kind are template arguments so that each variant is a branch-free
// loop the compiler vectorises.
template <int kWeighting, int kStep>
Partial update_run(const UpdateParams& params, BiasCorrection bc, float* __restrict x, const float* __restrict x0,
                   const float* __restrict reconstruction, const float* __restrict grad,
                   const float* __restrict mask, float* __restrict m, float* __restrict v, std::int64_t count) {
  const UpdateParams p = params;  // a local copy: the stores to x cannot alias it
  double before = 0.0, after = 0.0;
  for (std::int64_t i0 = 0; i0 < count; i0 += 64) {  // float sums over 64 pixels, added into doubles
    const std::int64_t i1 = std::min(count, i0 + 64);
    float run_before = 0.0f, run_after = 0.0f;
#pragma omp simd reduction(+ : run_before, run_after)
    for (std::int64_t i = i0; i < i1; ++i) {
      const float xi = x[i];
      const float g = weighted_gradient(kWeighting, p.lam, xi, x0[i], reconstruction[i], grad[i], kWeighting == kMask ? mask[i] : 1.0f);
      const Stepped st = stepped_value(kStep, p, bc, xi, g, kStep == kAdam ? m[i] : 0.0f, kStep == kAdam ? v[i] : 0.0f);
      if (kStep == kAdam) {
        m[i] = st.m;
        v[i] = st.v;
      }
      const float xn = st.x;
      x[i] = xn;
      run_before += std::fabs(xi - x0[i]);
      run_after += std::fabs(xn - x0[i]);
    }
    before += run_before;
    after += run_after;
  }
  return {before, after};
}

Partial distance_run(const float* __restrict x, const float* __restrict x0, std::int64_t count) {
  double before = 0.0;
  for (std::int64_t i = 0; i < count; ++i) before += std::fabs(x[i] - x0[i]);
  return {before, before};
}

using RunFunction = Partial (*)(const UpdateParams&, BiasCorrection, float*, const float*, const float*,
                                const float*, const float*, float*, float*, std::int64_t);

RunFunction select_run(const UpdateParams& p) {
  const bool adam = p.step == kAdam;
  switch (p.weighting) {
    case kHadamard: return adam ? update_run<kHadamard, kAdam> : update_run<kHadamard, kPlain>;
    case kMask: return adam ? update_run<kMask, kAdam> : update_run<kMask, kPlain>;
    default: return adam ? update_run<kNone, kAdam> : update_run<kNone, kPlain>;
  }
}

}  // namespace

void update_cpu(const UpdateParams& p, const UpdateBuffers& b, int threads) {
  const int team = threads > 0 ? threads : cpu_threads();
  const std::int64_t plane = b.h * b.w;
  if (b.n == 0) return;
  const std::int64_t chunks = plane == 0 ? 0 : (plane + kChunk - 1) / kChunk;
  const std::int64_t tasks = b.n * b.c * chunks;
  std::vector<Partial> partials(static_cast<std::size_t>(tasks));
  const RunFunction run = select_run(p);

#pragma omp parallel for schedule(static) num_threads(team) if (team > 1 && b.n * b.c * plane >= kParallelPixels)
  for (std::int64_t t = 0; t < tasks; ++t) {
    const std::int64_t sample = t / (b.c * chunks);
    const std::int64_t channel = (t / chunks) % b.c;
    const std::int64_t start = (t % chunks) * kChunk;
    const std::int64_t count = std::min(kChunk, plane - start);
    const std::int64_t offset = (sample * b.c + channel) * plane + start;
    const float* mask = nullptr;
    if (b.mask) {
      const std::int64_t mask_channel = b.mask_channels == 1 ? 0 : channel;
      mask = b.mask + (sample * b.mask_channels + mask_channel) * plane + start;
    }
    if (b.active[sample] == 0) {
      partials[static_cast<std::size_t>(t)] = distance_run(b.x + offset, b.x0 + offset, count);
      continue;
    }
    const BiasCorrection bc = p.step == kAdam ? bias_correction(p, b.iterations[sample] + 1) : BiasCorrection{1.0f, 1.0f};
    partials[static_cast<std::size_t>(t)] =
        run(p, bc, b.x + offset, b.x0 + offset, b.reconstruction + offset, b.grad + offset, mask,
            b.m ? b.m + offset : nullptr, b.v ? b.v + offset : nullptr, count);
  }

  const std::int64_t per_sample = b.c * chunks;
  for (std::int64_t s = 0; s < b.n; ++s) {
    double before = 0.0, after = 0.0;
    for (std::int64_t t = s * per_sample; t < (s + 1) * per_sample; ++t) {
      before += partials[static_cast<std::size_t>(t)].before;
      after += partials[static_cast<std::size_t>(t)].after;
    }
    b.distance[s] = static_cast<float>(after);
    b.energy[s] = static_cast<float>(static_cast<double>(b.loss[s]) + static_cast<double>(p.lam) * before);
    if (b.active[s]) b.iterations[s] += 1;
  }
}

}  // namespace eproj
