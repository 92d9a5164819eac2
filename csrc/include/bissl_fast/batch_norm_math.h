// Per-channel math of BatchNorm forward, backward and double backward (docs/design.md §2.3: the
// HVP through a ResNet is a double backward through every BatchNorm), shared by the CPU kernels,
// the CUDA kernels and the C++ tests, so CPU CI runs the arithmetic the GPU runs.
//
// One channel holds M values x_i (M = N * H * W). With mean mu, biased variance var, s = 1/sqrt(var + eps),
// xc = x - mu, xhat = s xc and the per-channel weight w (1 without affine):
//
//   forward      y = w xhat + b
//   backward     gb = S_g,  gw = s S_gx,  gx = w s (g - S_g/M - xhat s S_gx/M)           (train)
//                gb = S_g,  gw = s S_gx,  gx = w s g                                        (eval)
//
// with S_g = sum g, S_gx = sum g xc. In train mode mu and s are functions of x (ds/dx_j = -s^2 xhat_j/M).
// The double backward is the VJP of (g, x, w) -> (gx, gw, gb) with cotangents (ggx, ggw, ggb). With
// A = s S_gx/M = mean(g xhat), B = s S_ggx/M = mean(ggx xhat), gbar = S_g/M, ggbar = S_gg/M, G1 = S_ggg
// (S_gg = sum ggx, S_ggx = sum ggx xc, S_ggg = sum ggx g), train mode:
//
//   d/dg  gG = w s (ggx - ggbar - xhat B) + ggw xhat + ggb
//   d/dw  gW = s (G1 - S_gg gbar - s S_ggx A)
//   d/dx  gI = w s^2 [xhat (3AB + gbar ggbar - G1/M) - B g - A ggx + B gbar + A ggbar]
//              + ggw s (g - gbar - xhat A)
//
// (gI differentiates <ggx, gx> + ggw gw through xhat, mu and s; gb does not depend on x or w.) Eval mode:
// gG = w s ggx + ggw xhat + ggb, gW = s G1, gI = ggw s g. The bias gets no double gradient.
//
// Every full-size output is a per-channel linear combination of g, xc and ggx: the kernels reduce the
// per-channel sums in one sweep, call the coefficient functions below once per channel, and stream
// the combination out in a second sweep. A batched Hessian-vector product applies the double backward to
// k cotangents (ggx, ggw, ggb) at once: S_g and S_gx (and the statistics) do not depend on the cotangent,
// so the batched kernels reduce them once per channel and only S_gg, S_ggx, S_ggg per cotangent.
#pragma once

#include <cmath>
#include <cstdint>

#include "bissl_fast/hd.h"

namespace bissl_fast {
namespace batch_norm {

// Correctly rounded 1/sqrt (device: even under --use_fast_math), as PyTorch's 1 / std::sqrt.
BISSL_HD float inv_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(1.0f, __fsqrt_rn(x));
#else
  return 1.0f / std::sqrt(x);
#endif
}
BISSL_HD double inv_sqrt(double x) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(1.0, __dsqrt_rn(x));
#else
  return 1.0 / std::sqrt(x);
#endif
}

// Forward: y = alpha x + beta, and the saved statistics.
template <typename T>
struct FwdCoef {
  T alpha, beta;
};

template <typename T>
BISSL_HD FwdCoef<T> fwd_coef(T mean, T invstd, T w, T b) {
  FwdCoef<T> k;
  k.alpha = w * invstd;
  k.beta = b - mean * k.alpha;
  return k;
}

// PyTorch's running-stat update: the unbiased variance var_sum / (M - 1) enters the running variance.
template <typename T>
BISSL_HD T running_update(T running, T batch, T momentum) {
  return momentum * batch + (T(1) - momentum) * running;
}

// Backward: gx = k_g g + k_x xc + k_0; gw = s S_gx, gb = S_g.
template <typename T>
struct BwdCoef {
  T k_g, k_x, k_0;
  T gw, gb;
};

template <typename T>
BISSL_HD BwdCoef<T> bwd_coef(bool train, T m, T invstd, T w, T s_g, T s_gx) {
  BwdCoef<T> k;
  const T ws = w * invstd;
  k.k_g = ws;
  k.gw = invstd * s_gx;
  k.gb = s_g;
  if (train) {
    k.k_x = -ws * invstd * invstd * s_gx / m;
    k.k_0 = -ws * s_g / m;
  } else {
    k.k_x = T(0);
    k.k_0 = T(0);
  }
  return k;
}

// Double backward:
//   gI = i_g g + i_x xc + i_gg ggx + i_0
//   gG = o_gg ggx + o_x xc + o_0
//   gW = gw
// Sums: s_g = sum g, s_gx = sum g xc, s_gg = sum ggx, s_ggx = sum ggx xc, s_ggg = sum ggx g (zero for an
// absent ggx); ggw, ggb the per-channel cotangents of gw, gb (zero when absent).
template <typename T>
struct DbwdCoef {
  T i_g, i_x, i_gg, i_0;
  T o_gg, o_x, o_0;
  T gw;
};

template <typename T>
BISSL_HD DbwdCoef<T> dbwd_coef(bool train, T m, T invstd, T w, T s_g, T s_gx, T s_gg, T s_ggx, T s_ggg, T ggw,
                               T ggb) {
  const T s = invstd;
  const T ws = w * s;
  DbwdCoef<T> k;
  if (!train) {
    k.i_g = ggw * s;
    k.i_x = T(0);
    k.i_gg = T(0);
    k.i_0 = T(0);
    k.o_gg = ws;
    k.o_x = ggw * s;
    k.o_0 = ggb;
    k.gw = s * s_ggg;
    return k;
  }
  const T a = s * s_gx / m;   // mean(g xhat)
  const T b = s * s_ggx / m;  // mean(ggx xhat)
  const T gbar = s_g / m;
  const T ggbar = s_gg / m;
  const T ws2 = ws * s;
  // gI; xhat = s xc folds one more s into the xc coefficient.
  k.i_x = ws2 * s * (T(3) * a * b + gbar * ggbar - s_ggg / m) - ggw * s * s * a;
  k.i_g = -ws2 * b + ggw * s;
  k.i_gg = -ws2 * a;
  k.i_0 = ws2 * (b * gbar + a * ggbar) - ggw * s * gbar;
  // gG
  k.o_gg = ws;
  k.o_x = (ggw - ws * b) * s;
  k.o_0 = ggb - ws * ggbar;
  // gW
  k.gw = s * (s_ggg - s_gg * gbar - s * s_ggx * a);
  return k;
}

// Host row sums over one contiguous run of a channel, in kLanes partial sums per quantity (lane j sums
// the elements j mod kLanes, the tail goes to lane 0, the lanes are totalled in order). This is the
// reference order the C++ tests check; the CPU kernels compute the same sums in the same order with
// vector types (csrc/cpu/batch_norm_cpu_kernels.h), the CUDA kernels with warp shuffles.
constexpr int kLanes = 8;

template <typename T, int K>
BISSL_HD T lane_total(const T (&v)[K]) {
  T total = 0;
  for (int j = 0; j < K; ++j) total += v[j];
  return total;
}

// sum x
template <typename T, typename S>
inline T row_sum(const S* x, int64_t n) {
  T a[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) a[j] += static_cast<T>(x[i + j]);
  }
  for (; i < n; ++i) a[0] += static_cast<T>(x[i]);
  return lane_total(a);
}

// sum (x - mean)^2
template <typename T, typename S>
inline T row_sum_sq_dev(const S* x, int64_t n, T mean) {
  T a[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const T d = static_cast<T>(x[i + j]) - mean;
      a[j] += d * d;
    }
  }
  for (; i < n; ++i) {
    const T d = static_cast<T>(x[i]) - mean;
    a[0] += d * d;
  }
  return lane_total(a);
}

// (sum g, sum g (x - mean))
template <typename T, typename S>
inline void row_sums_bwd(const S* g, const S* x, int64_t n, T mean, T& s_g, T& s_gx) {
  T a[kLanes] = {}, b[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const T gv = static_cast<T>(g[i + j]);
      a[j] += gv;
      b[j] += gv * (static_cast<T>(x[i + j]) - mean);
    }
  }
  for (; i < n; ++i) {
    const T gv = static_cast<T>(g[i]);
    a[0] += gv;
    b[0] += gv * (static_cast<T>(x[i]) - mean);
  }
  s_g += lane_total(a);
  s_gx += lane_total(b);
}

// (sum g, sum g (x - mean), sum ggx, sum ggx (x - mean), sum ggx g): every sum of the double backward
// in one pass over the three inputs.
template <typename T, typename S>
inline void row_sums_dbwd(const S* gg, const S* g, const S* x, int64_t n, T mean, T& s_g, T& s_gx, T& s_gg,
                          T& s_ggx, T& s_ggg) {
  T a[kLanes] = {}, b[kLanes] = {}, c[kLanes] = {}, d[kLanes] = {}, e[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const T gv = static_cast<T>(g[i + j]), ggv = static_cast<T>(gg[i + j]);
      const T xc = static_cast<T>(x[i + j]) - mean;
      a[j] += gv;
      b[j] += gv * xc;
      c[j] += ggv;
      d[j] += ggv * xc;
      e[j] += ggv * gv;
    }
  }
  for (; i < n; ++i) {
    const T gv = static_cast<T>(g[i]), ggv = static_cast<T>(gg[i]);
    const T xc = static_cast<T>(x[i]) - mean;
    a[0] += gv;
    b[0] += gv * xc;
    c[0] += ggv;
    d[0] += ggv * xc;
    e[0] += ggv * gv;
  }
  s_g += lane_total(a);
  s_gx += lane_total(b);
  s_gg += lane_total(c);
  s_ggx += lane_total(d);
  s_ggg += lane_total(e);
}

// (sum ggx, sum ggx (x - mean), sum ggx g): the cotangent's part of row_sums_dbwd, in the same lanes and
// order (so row_sums_bwd + row_sums_cotangent give exactly row_sums_dbwd's five sums).
template <typename T, typename S>
inline void row_sums_cotangent(const S* gg, const S* g, const S* x, int64_t n, T mean, T& s_gg, T& s_ggx,
                               T& s_ggg) {
  T c[kLanes] = {}, d[kLanes] = {}, e[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const T ggv = static_cast<T>(gg[i + j]);
      c[j] += ggv;
      d[j] += ggv * (static_cast<T>(x[i + j]) - mean);
      e[j] += ggv * static_cast<T>(g[i + j]);
    }
  }
  for (; i < n; ++i) {
    const T ggv = static_cast<T>(gg[i]);
    c[0] += ggv;
    d[0] += ggv * (static_cast<T>(x[i]) - mean);
    e[0] += ggv * static_cast<T>(g[i]);
  }
  s_gg += lane_total(c);
  s_ggx += lane_total(d);
  s_ggg += lane_total(e);
}

}  // namespace batch_norm
}  // namespace bissl_fast
