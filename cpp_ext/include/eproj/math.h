// The per-pixel math of the two kernels, shared by the C++ (cpu/) and the CUDA
// (cuda/) implementations so the copies cannot drift. Semantics are those of the
// plain reference: eproj.train.projection.update_step (the update) and
// eproj.train.losses.dssim_map (DSSIM).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define EPROJ_HD __host__ __device__ __forceinline__
#else
#define EPROJ_HD inline
#endif

namespace eproj {

// ---------------------------------------------------------------------------
// Update
// ---------------------------------------------------------------------------

enum Weighting : int { kHadamard = 0, kMask = 1, kNone = 2 };
enum StepKind : int { kPlain = 0, kAdam = 1 };

struct UpdateParams {
  float alpha;
  float lam;
  int weighting;   // Weighting
  int step;        // StepKind
  float beta1, beta2, eps;
  float one_minus_beta1, one_minus_beta2;  // 1 - beta, rounded once from double like the reference
  float value_min, value_max;
};

// Pointers of one update call; every image tensor is (n, c, h, w) float32,
// contiguous. mask is (n, mask_channels, h, w) or null; m, v are null unless
// step == kAdam. loss, distance, energy are (n,) float32; active is (n,) uint8;
// iterations is (n,) int32.
struct UpdateBuffers {
  float* x;
  const float* x0;
  const float* reconstruction;
  const float* grad;
  const float* mask;
  float* m;
  float* v;
  const float* loss;
  const std::uint8_t* active;
  std::int32_t* iterations;
  float* distance;
  float* energy;
  std::int64_t n, c, h, w, mask_channels;
};

// sign(d) in {-1, 0, 1}, written without branches so that loops over it vectorise.
EPROJ_HD float sign_of(float d) { return static_cast<float>(static_cast<int>(d > 0.0f) - static_cast<int>(d < 0.0f)); }

EPROJ_HD float clamp_to(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// grad E = grad Lr + lambda * sign(x - x0), weighted per the mode. The mode
// is an argument of its own so that callers can pass a compile-time constant.
EPROJ_HD float weighted_gradient(int weighting, float lam, float x, float x0, float reconstruction, float grad,
                                 float mask) {
  const float g = grad + lam * sign_of(x - x0);
  if (weighting == kHadamard) {
    const float r = x - reconstruction;
    return g * (r * r);
  }
  if (weighting == kMask) return g * mask;
  return g;
}

// Adam's bias corrections 1 - beta^t for a sample that takes its t-th step (t >= 1).
struct BiasCorrection {
  float first, second;
};

EPROJ_HD BiasCorrection bias_correction(const UpdateParams& p, std::int32_t t) {
  return {1.0f - powf(p.beta1, static_cast<float>(t)), 1.0f - powf(p.beta2, static_cast<float>(t))};
}

// One pixel's new value, and its Adam moments (unchanged for the plain step).
struct Stepped {
  float x, m, v;
};

EPROJ_HD Stepped stepped_value(int step, const UpdateParams& p, BiasCorrection bc, float x, float g, float m,
                               float v) {
  float moved;
  if (step == kAdam) {
    m = p.beta1 * m + p.one_minus_beta1 * g;
    v = p.beta2 * v + p.one_minus_beta2 * (g * g);
    const float m_hat = m / bc.first;
    const float v_hat = v / bc.second;
    moved = x - (p.alpha * m_hat) / (sqrtf(v_hat) + p.eps);
  } else {
    moved = x - p.alpha * g;
  }
  return {clamp_to(moved, p.value_min, p.value_max), m, v};
}

// ---------------------------------------------------------------------------
// Stop check: per sample, on each iterate before the update
// ---------------------------------------------------------------------------

enum StopReason : int { kMaxIters = 0, kThreshold = 1, kConverged = 2 };

struct StopParams {
  float lam;
  int has_threshold;
  float threshold;   // stop when loss <= threshold (if has_threshold)
  float energy_tol;  // stop when |E_prev - E| <= energy_tol |E_prev| (if > 0 and a step was taken)
};

// All (n,): loss, distance in; iterations read; active, previous, reason,
// final_loss, final_energy read and written.
struct StopBuffers {
  const float* loss;
  const float* distance;
  const std::int32_t* iterations;
  std::uint8_t* active;
  float* previous;
  std::int32_t* reason;
  float* final_loss;
  float* final_energy;
  std::int64_t n;
};

EPROJ_HD void stop_sample(const StopParams& p, const StopBuffers& b, std::int64_t i) {
  const float energy = b.loss[i] + p.lam * b.distance[i];
  if (b.active[i]) {
    b.final_loss[i] = b.loss[i];
    b.final_energy[i] = energy;
    if (p.has_threshold && b.loss[i] <= p.threshold) {
      b.active[i] = 0;
      b.reason[i] = kThreshold;
    } else if (p.energy_tol > 0.0f && b.iterations[i] > 0 &&
               fabsf(b.previous[i] - energy) <= p.energy_tol * fabsf(b.previous[i])) {
      b.active[i] = 0;
      b.reason[i] = kConverged;
    }
  }
  b.previous[i] = energy;
}

// ---------------------------------------------------------------------------
// DSSIM
//
// The 2-D Gaussian window is separable. The moments are accumulated in the
// centred form of the law of total variance,
//   Var = sum_r w_r Var_r + sum_r w_r (mean_r - mean)^2,
// where r runs over the window's rows and Var_r, mean_r are each row's
// horizontal Gaussian moments. Every sum is then a sum of products of centred
// values, so float32 keeps about 1e-6 absolute where E[x^2] - E[x]^2 loses
// 1e-4 in flat regions.
// ---------------------------------------------------------------------------

constexpr int kMaxWindow = 31;

struct DssimParams {
  float taps[kMaxWindow];  // normalised 1-D Gaussian, `window` of them
  int window;
  float c1, c2;            // (K1 L)^2, (K2 L)^2
  float threshold;         // mask = dssim > threshold
};

// Mirror with the edge included (d c b a | a b c d); valid for -n <= i < 2n.
EPROJ_HD std::int64_t reflect_index(std::int64_t i, std::int64_t n) {
  return i < 0 ? -i - 1 : (i >= n ? 2 * n - i - 1 : i);
}

// Horizontal moments of one window row. xs, ys point at the first of `window`
// consecutive samples.
struct RowMoments {
  float mx, my, cxx, cyy, cxy;
};

//
// kWindow > 0 fixes the window at compile time (the loops unroll and the
// callers' pixel loops vectorise); kWindow == 0 reads it from p.window.
template <int kWindow>
EPROJ_HD RowMoments row_moments(const DssimParams& p, const float* xs, const float* ys) {
  const int window = kWindow > 0 ? kWindow : p.window;
  float mx = 0.0f, my = 0.0f;
  for (int k = 0; k < window; ++k) {
    mx += p.taps[k] * xs[k];
    my += p.taps[k] * ys[k];
  }
  float cxx = 0.0f, cyy = 0.0f, cxy = 0.0f;
  for (int k = 0; k < window; ++k) {
    const float dx = xs[k] - mx, dy = ys[k] - my;
    cxx += p.taps[k] * (dx * dx);
    cyy += p.taps[k] * (dy * dy);
    cxy += p.taps[k] * (dx * dy);
  }
  return {mx, my, cxx, cyy, cxy};
}

// Combine `window` rows of horizontal moments, stored as five planes with a
// row stride, into the window's DSSIM. Each plane pointer points at the
// first row of the window.
template <int kWindow>
EPROJ_HD float window_dssim(const DssimParams& p, const float* mx, const float* my, const float* cxx,
                            const float* cyy, const float* cxy, std::int64_t stride) {
  const int window = kWindow > 0 ? kWindow : p.window;
  float ux = 0.0f, uy = 0.0f;
  for (int k = 0; k < window; ++k) {
    ux += p.taps[k] * mx[k * stride];
    uy += p.taps[k] * my[k * stride];
  }
  float vx = 0.0f, vy = 0.0f, vxy = 0.0f;
  for (int k = 0; k < window; ++k) {
    const float dx = mx[k * stride] - ux, dy = my[k * stride] - uy;
    vx += p.taps[k] * (cxx[k * stride] + dx * dx);
    vy += p.taps[k] * (cyy[k * stride] + dy * dy);
    vxy += p.taps[k] * (cxy[k * stride] + dx * dy);
  }
  const float num = (2.0f * ux * uy + p.c1) * (2.0f * vxy + p.c2);
  const float den = (ux * ux + uy * uy + p.c1) * (vx + vy + p.c2);
  return (1.0f - num / den) * 0.5f;
}

// Host-side: the taps and constants. Taps are computed in double and rounded
// once, like the reference's float64 taps cast to float32.
inline DssimParams make_dssim_params(int window, double sigma, double data_range, double k1, double k2,
                                     double threshold) {
  DssimParams p{};
  p.window = window;
  const int r = window / 2;
  double w[kMaxWindow];
  double total = 0.0;
  for (int k = 0; k < window; ++k) {
    const double t = static_cast<double>(k - r);
    w[k] = std::exp(-(t * t) / (2.0 * sigma * sigma));
    total += w[k];
  }
  for (int k = 0; k < window; ++k) p.taps[k] = static_cast<float>(w[k] / total);
  p.c1 = static_cast<float>((k1 * data_range) * (k1 * data_range));
  p.c2 = static_cast<float>((k2 * data_range) * (k2 * data_range));
  p.threshold = static_cast<float>(threshold);
  return p;
}

// Pointers of one DSSIM call. x, y: (n, c, h, w) float32 contiguous; out:
// (n, h, w) float32; mask (n, h, w) uint8 or null; max, mean (n,) float32 or
// null (both or neither).
struct DssimBuffers {
  const float* x;
  const float* y;
  float* out;
  std::uint8_t* mask;
  float* max;
  float* mean;
  std::int64_t n, c, h, w;
};

}  // namespace eproj
