// Row math of the BYOL normalized-regression loss (docs/design.md §2.2), shared by the CPU kernel,
// the CUDA kernel and the C++ tests, so CPU CI runs the arithmetic the GPU runs.
//
// One row pair (p, t) of length D, all in the accumulation type T (float for float/bf16/half
// inputs, double for double):
//
//   n_p = max(||p||, eps), u = p / n_p   (eps = 1e-12, the semantics of F.normalize)
//   n_t = max(||t||, eps), v = t / n_t
//   c   = u . v,  loss = 2 - 2c
//
// F.normalize clamps the norm, so below eps the denominator is a constant and its derivative
// vanishes: du/dp = (I - a u u^T) / n_p with a = [||p|| >= eps] (same for t with b). Then
//
//   gp = dc/dp = (v - a c u) / n_p,     gt = dc/dt = (u - b c v) / n_t.
//
// For a per-row upstream gradient g of the row loss: dp = -2 g gp, dt = -2 g gt.
//
// The double backward is the vector-Jacobian product of (g, p, t) -> (dp, dt) with cotangents
// (Wp, Wt): the Hessian of c is symmetric, so it equals the directional derivative of (gp, gt)
// along (Wp, Wt):
//
//   dc  = (v.Wp - a c u.Wp) / n_p + (u.Wt - b c v.Wt) / n_t
//   d gp = [Wt / n_t - b (v.Wt) v / n_t - a dc u - a c (Wp - a u (u.Wp)) / n_p] / n_p
//          - a (u.Wp) gp / n_p
//   d gt = the same with (p, u, a, n_p, Wp) <-> (t, v, b, n_t, Wt)
//   out:  dgrad = -2 dc,  dp' = -2 g d gp,  dt' = -2 g d gt.
//
// Every output element is a per-row linear combination of p_i, t_i, Wp_i, Wt_i: the kernels
// reduce a few dot products per row, call the coefficient functions below once per row, and
// then stream the combination out.
#pragma once

#include <cmath>
#include <cstdint>

#include "bissl_fast/hd.h"

namespace bissl_fast {
namespace byol {

// F.normalize's default epsilon.
constexpr double kNormEps = 1e-12;

// Correctly rounded square roots on both sides (device: even under --use_fast_math).
BISSL_HD float row_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}
BISSL_HD double row_sqrt(double x) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

// Per-row state derived from the three dot products p.p, t.t, p.t.
template <typename T>
struct Row {
  T inv_np;  // 1 / max(||p||, eps)
  T inv_nt;  // 1 / max(||t||, eps)
  T a;       // 1 if ||p|| >= eps (the norm is differentiated), else 0 (clamped, constant)
  T b;       // same for t
  T c;       // cosine u . v (a plain scaled dot product in the clamped regime)
};

template <typename T>
BISSL_HD Row<T> make_row(T pp, T tt, T pt) {
  const T eps = static_cast<T>(kNormEps);
  const T np = row_sqrt(pp);
  const T nt = row_sqrt(tt);
  Row<T> r;
  r.a = np >= eps ? T(1) : T(0);
  r.b = nt >= eps ? T(1) : T(0);
  r.inv_np = T(1) / (np >= eps ? np : eps);
  r.inv_nt = T(1) / (nt >= eps ? nt : eps);
  // (p / n_p) . (t / n_t): scale the dot product rather than the vectors.
  r.c = pt * r.inv_np * r.inv_nt;
  return r;
}

template <typename T>
BISSL_HD T loss(const Row<T>& r) {
  return T(2) - T(2) * r.c;
}

// dp = p_p * p + p_t * t,  dt = t_t * t + t_p * p.
template <typename T>
struct GradCoef {
  T p_p, p_t, t_t, t_p;
};

template <typename T>
BISSL_HD GradCoef<T> grad_coef(const Row<T>& r, T g) {
  // gp = (v - a c u) / n_p = t / (n_p n_t) - a c p / n_p^2
  GradCoef<T> k;
  const T cross = T(-2) * g * r.inv_np * r.inv_nt;
  k.p_t = cross;
  k.p_p = T(2) * g * r.a * r.c * r.inv_np * r.inv_np;
  k.t_p = cross;
  k.t_t = T(2) * g * r.b * r.c * r.inv_nt * r.inv_nt;
  return k;
}

// Double-backward coefficients:
//   dp' = p_p * p + p_t * t + p_wp * Wp + p_wt * Wt
//   dt' = t_p * p + t_t * t + t_wp * Wp + t_wt * Wt
//   dgrad = dg
// Inputs are raw dot products with the cotangents: p.Wp, t.Wp, p.Wt, t.Wt (pass 0 for an absent Wt).
template <typename T>
struct HvpCoef {
  T dg;
  T p_p, p_t, p_wp, p_wt;
  T t_p, t_t, t_wp, t_wt;
};

template <typename T>
BISSL_HD HvpCoef<T> hvp_coef(const Row<T>& r, T g, T p_wp, T t_wp, T p_wt, T t_wt) {
  const T ip = r.inv_np, it = r.inv_nt, a = r.a, b = r.b, c = r.c;
  // Dot products of the unit vectors with the cotangents.
  const T u_wp = p_wp * ip, v_wp = t_wp * it, u_wt = p_wt * ip, v_wt = t_wt * it;
  const T dc = (v_wp - a * c * u_wp) * ip + (u_wt - b * c * v_wt) * it;
  const T s = T(-2) * g;
  HvpCoef<T> k;
  k.dg = T(-2) * dc;
  // d gp in the basis (u, v, Wp, Wt); a^2 = a folds the two u.Wp terms of the u coefficient.
  const T gp_u = -a * dc * ip + T(2) * a * c * u_wp * ip * ip;
  const T gp_v = -b * v_wt * it * ip - a * u_wp * ip * ip;
  k.p_wp = s * (-a * c * ip * ip);
  k.p_wt = s * (ip * it);
  k.p_p = s * gp_u * ip;  // u = p / n_p
  k.p_t = s * gp_v * it;  // v = t / n_t
  // d gt: the mirror image.
  const T gt_v = -b * dc * it + T(2) * b * c * v_wt * it * it;
  const T gt_u = -a * u_wp * ip * it - b * v_wt * it * it;
  k.t_wt = s * (-b * c * it * it);
  k.t_wp = s * (ip * it);
  k.t_t = s * gt_v * it;
  k.t_p = s * gt_u * ip;
  return k;
}

// Host row reductions (the CPU kernel and the C++ tests; the CUDA kernel reduces the same sums
// with warp shuffles). S is the storage type, converted to T per element. Plain running sums:
// an 8-lane partial-sum variant that gcc -O3 vectorizes measured no faster (slower in cache) on
// the CI CPUs, so the simplest order is kept.

// (p.p, t.t, p.t)
template <typename T, typename S>
inline void row_sums(const S* p, const S* t, int64_t d, T& pp, T& tt, T& pt) {
  pp = 0;
  tt = 0;
  pt = 0;
  for (int64_t i = 0; i < d; ++i) {
    const T x = static_cast<T>(p[i]), y = static_cast<T>(t[i]);
    pp += x * x;
    tt += y * y;
    pt += x * y;
  }
}

// The row state from the inputs, for host code.
template <typename T, typename S>
inline Row<T> row_from(const S* p, const S* t, int64_t d) {
  T pp, tt, pt;
  row_sums<T>(p, t, d, pp, tt, pt);
  return make_row<T>(pp, tt, pt);
}

// (p.w, t.w): the cotangent dot products of the double backward.
template <typename T, typename S>
inline void row_sums_with(const S* p, const S* t, const S* w, int64_t d, T& pw, T& tw) {
  pw = 0;
  tw = 0;
  for (int64_t i = 0; i < d; ++i) {
    const T z = static_cast<T>(w[i]);
    pw += static_cast<T>(p[i]) * z;
    tw += static_cast<T>(t[i]) * z;
  }
}

}  // namespace byol
}  // namespace bissl_fast
