// BYOL normalized-regression row ops (docs/design.md §2.2): schemas and CPU kernels.
//
//   byol_fwd(p, t)                              -> loss [B]        2 - 2 cos(p_b, t_b)
//   byol_bwd(grad, p, t, t_grad)                -> (dp, dt)        vjp of byol_fwd
//   byol_hvp(grad, p, t, wp, wt?, t_grad)       -> (dgrad, dp, dt) vjp of byol_bwd (double backward)
//   byol_hvp_batched(grad, p, t, wp, wt?, t_grad)  byol_hvp for k cotangents wp, wt [k, B, D] at once
//                                               -> (dgrad [k, B], dp [k, B, D], dt [k, B, D] or [0])
//
// p, t, wp, wt are [B, D]; grad and dgrad are [B]. dt is [B, D] when t_grad, else an empty [0]
// tensor (targets are normally detached, so the kernel skips that write). An absent wt is a zero
// cotangent. The batched op (the batching rule of byol_hvp, for batched Hessian-vector products) reduces
// each row's norms once for all k cotangents. The arithmetic lives in bissl_fast/byol_math.h, shared with the CUDA kernel; the
// autograd formulas that chain the three ops are registered from Python (bissl_fast/byol.py).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../byol_checks.h"
#include "../output_alloc.h"
#include "bissl_fast/byol_math.h"

namespace bissl_fast {
namespace {

namespace bm = byol;

using byol_checks::check_batch_like;
using byol_checks::check_grad;
using byol_checks::check_like;
using byol_checks::check_rows;

// Rows per parallel task: enough elements that the task outweighs the scheduling cost.
int64_t grain(int64_t d) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));
}

// Row reductions with independent partial sums. The header's bm::row_sums keeps one running sum
// per dot product: a chain of dependent adds the compiler may not reorder (no -ffast-math), so it
// runs scalar at the add latency, and the forward was slower than the reference at B=4096, D=256.
// Here float/double rows use 2 x 16-byte vector accumulators per sum (GCC/Clang vector
// extensions: SSE2 is the x86-64 baseline), other element types (bf16/half, converted to float)
// kLanes scalar accumulators. The sums differ from the header's order only by rounding.
constexpr int64_t kLanes = 4;

#if defined(__GNUC__)
template <typename T>
struct Simd {
  typedef T type __attribute__((vector_size(16)));
  static constexpr int64_t kWidth = 16 / sizeof(T);
};

template <typename T>
typename Simd<T>::type load(const T* x) {
  typename Simd<T>::type v;
  std::memcpy(&v, x, sizeof(v));
  return v;
}

template <typename T>
T lane_total(const typename Simd<T>::type& v) {
  T total = 0;
  for (int64_t l = 0; l < Simd<T>::kWidth; ++l) total += v[l];
  return total;
}
#endif

// (p.p, t.t, p.t) of one row pair.
template <typename T, typename S>
void fast_row_sums(const S* p, const S* t, int64_t d, T& pp, T& tt, T& pt) {
  int64_t i = 0;
  pp = tt = pt = 0;
#if defined(__GNUC__)
  if constexpr (std::is_same_v<S, T>) {
    using V = typename Simd<T>::type;
    constexpr int64_t W = Simd<T>::kWidth;
    V a0{}, a1{}, b0{}, b1{}, c0{}, c1{};
    for (; i + 2 * W <= d; i += 2 * W) {
      const V x0 = load(p + i), x1 = load(p + i + W), y0 = load(t + i), y1 = load(t + i + W);
      a0 += x0 * x0;
      a1 += x1 * x1;
      b0 += y0 * y0;
      b1 += y1 * y1;
      c0 += x0 * y0;
      c1 += x1 * y1;
    }
    pp = lane_total<T>(a0 + a1);
    tt = lane_total<T>(b0 + b1);
    pt = lane_total<T>(c0 + c1);
  }
#endif
  T app[kLanes] = {}, att[kLanes] = {}, apt[kLanes] = {};
  for (; i + kLanes <= d; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const T x = static_cast<T>(p[i + l]), y = static_cast<T>(t[i + l]);
      app[l] += x * x;
      att[l] += y * y;
      apt[l] += x * y;
    }
  }
  for (int64_t l = 0; i < d; ++i, ++l) {
    const T x = static_cast<T>(p[i]), y = static_cast<T>(t[i]);
    app[l] += x * x;
    att[l] += y * y;
    apt[l] += x * y;
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    pp += app[l];
    tt += att[l];
    pt += apt[l];
  }
}

// (p.w, t.w): the cotangent dot products of the double backward.
template <typename T, typename S>
void fast_row_sums_with(const S* p, const S* t, const S* w, int64_t d, T& pw, T& tw) {
  int64_t i = 0;
  pw = tw = 0;
#if defined(__GNUC__)
  if constexpr (std::is_same_v<S, T>) {
    using V = typename Simd<T>::type;
    constexpr int64_t W = Simd<T>::kWidth;
    V a0{}, a1{}, b0{}, b1{};
    for (; i + 2 * W <= d; i += 2 * W) {
      const V z0 = load(w + i), z1 = load(w + i + W);
      a0 += load(p + i) * z0;
      a1 += load(p + i + W) * z1;
      b0 += load(t + i) * z0;
      b1 += load(t + i + W) * z1;
    }
    pw = lane_total<T>(a0 + a1);
    tw = lane_total<T>(b0 + b1);
  }
#endif
  T apw[kLanes] = {}, atw[kLanes] = {};
  for (; i + kLanes <= d; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const T z = static_cast<T>(w[i + l]);
      apw[l] += static_cast<T>(p[i + l]) * z;
      atw[l] += static_cast<T>(t[i + l]) * z;
    }
  }
  for (int64_t l = 0; i < d; ++i, ++l) {
    const T z = static_cast<T>(w[i]);
    apw[l] += static_cast<T>(p[i]) * z;
    atw[l] += static_cast<T>(t[i]) * z;
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    pw += apw[l];
    tw += atw[l];
  }
}

template <typename T, typename S>
bm::Row<T> fast_row_from(const S* p, const S* t, int64_t d) {
  T pp, tt, pt;
  fast_row_sums<T>(p, t, d, pp, tt, pt);
  return bm::make_row<T>(pp, tt, pt);
}

at::Tensor byol_fwd_cpu(const at::Tensor& p_in, const at::Tensor& t_in) {
  check_rows(p_in, t_in, "byol_fwd");
  const auto p = p_in.contiguous(), t = t_in.contiguous();
  const int64_t B = p.size(0), D = p.size(1);
  auto out = empty_output({B}, p.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "byol_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(D), [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const auto row = fast_row_from<acc_t>(pp + b * D, tp + b * D, D);
        o[b] = static_cast<scalar_t>(bm::loss(row));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> byol_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& p_in,
                                                const at::Tensor& t_in, bool t_grad) {
  check_rows(p_in, t_in, "byol_bwd");
  check_grad(grad_in, p_in, "byol_bwd");
  const auto p = p_in.contiguous(), t = t_in.contiguous(), grad = grad_in.contiguous();
  const int64_t B = p.size(0), D = p.size(1);
  auto dp = empty_output_like(p);
  auto dt = t_grad ? empty_output_like(t) : at::empty({0}, p.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "byol_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* dpp = dp.mutable_data_ptr<scalar_t>();
    scalar_t* dtp = t_grad ? dt.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, grain(D), [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const scalar_t* pr = pp + b * D;
        const scalar_t* tr = tp + b * D;
        const auto row = fast_row_from<acc_t>(pr, tr, D);
        const auto k = bm::grad_coef(row, static_cast<acc_t>(g[b]));
        // Separate loops without branches, so each one vectorizes.
        scalar_t* dpr = dpp + b * D;
        for (int64_t i = 0; i < D; ++i) {
          dpr[i] = static_cast<scalar_t>(k.p_p * static_cast<acc_t>(pr[i]) + k.p_t * static_cast<acc_t>(tr[i]));
        }
        if (dtp) {
          scalar_t* dtr = dtp + b * D;
          for (int64_t i = 0; i < D; ++i) {
            dtr[i] = static_cast<scalar_t>(k.t_t * static_cast<acc_t>(tr[i]) + k.t_p * static_cast<acc_t>(pr[i]));
          }
        }
      }
    });
  });
  return {dp, dt};
}

// The double backward of one row pair for one cotangent (wp, wt?), given the row's norms: the four
// cotangent dot products, the coefficients, then one branch-free loop per (output, wt present) case, so
// each one vectorizes.
template <typename scalar_t, typename acc_t>
inline void hvp_row(const bm::Row<acc_t>& row, acc_t g, const scalar_t* pr, const scalar_t* tr, const scalar_t* wpr,
                    const scalar_t* wtr, int64_t D, scalar_t* dgp, scalar_t* dpr, scalar_t* dtr) {
  acc_t s_pwp, s_twp, s_pwt = 0, s_twt = 0;
  fast_row_sums_with<acc_t>(pr, tr, wpr, D, s_pwp, s_twp);
  if (wtr) fast_row_sums_with<acc_t>(pr, tr, wtr, D, s_pwt, s_twt);
  const auto k = bm::hvp_coef(row, g, s_pwp, s_twp, s_pwt, s_twt);
  *dgp = static_cast<scalar_t>(k.dg);
  if (wtr) {
    for (int64_t i = 0; i < D; ++i) {
      const acc_t x = pr[i], y = tr[i], w = wpr[i], z = wtr[i];
      dpr[i] = static_cast<scalar_t>(k.p_p * x + k.p_t * y + k.p_wp * w + k.p_wt * z);
    }
    if (dtr) {
      for (int64_t i = 0; i < D; ++i) {
        const acc_t x = pr[i], y = tr[i], w = wpr[i], z = wtr[i];
        dtr[i] = static_cast<scalar_t>(k.t_p * x + k.t_t * y + k.t_wp * w + k.t_wt * z);
      }
    }
  } else {
    for (int64_t i = 0; i < D; ++i) {
      const acc_t x = pr[i], y = tr[i], w = wpr[i];
      dpr[i] = static_cast<scalar_t>(k.p_p * x + k.p_t * y + k.p_wp * w);
    }
    if (dtr) {
      for (int64_t i = 0; i < D; ++i) {
        const acc_t x = pr[i], y = tr[i], w = wpr[i];
        dtr[i] = static_cast<scalar_t>(k.t_p * x + k.t_t * y + k.t_wp * w);
      }
    }
  }
}

// byol_hvp over K cotangents (K = 1: the op itself; wp, wt, dgrad, dp, dt hold K consecutive [B, ...]
// blocks): each row's norms are reduced once, then the row is combined with every cotangent.
constexpr int64_t kBatchedRowBlockBytes = int64_t(1) << 15;

void hvp_rows(const at::Tensor& grad, const at::Tensor& p, const at::Tensor& t, const at::Tensor& wp,
              const at::Tensor& wt, at::Tensor& dgrad, at::Tensor& dp, at::Tensor& dt, bool t_grad, int64_t K) {
  const int64_t B = p.size(0), D = p.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "byol_hvp_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* wpp = wp.const_data_ptr<scalar_t>();
    const scalar_t* wtp = wt.defined() ? wt.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* dgp = dgrad.mutable_data_ptr<scalar_t>();
    scalar_t* dpp = dp.mutable_data_ptr<scalar_t>();
    scalar_t* dtp = t_grad ? dt.mutable_data_ptr<scalar_t>() : nullptr;
    // Rows go in blocks whose p and t stay in cache while every cotangent passes over them: each cotangent
    // then streams a contiguous run of its own rows (a loop over the k cotangents inside each row measured
    // 0.57x of k separate ops at k = 8 on a 2 MiB-L2 AMD EPYC: 2k strided streams defeat the prefetchers).
    const int64_t block = std::max<int64_t>(1, kBatchedRowBlockBytes / (D * static_cast<int64_t>(sizeof(scalar_t))));
    at::parallel_for(0, B, std::max<int64_t>(1, grain(D) / K), [&](int64_t lo, int64_t hi) {
      std::vector<decltype(fast_row_from<acc_t>(pp, tp, D))> rows;
      for (int64_t b0 = lo; b0 < hi; b0 += block) {
        const int64_t b1 = std::min(hi, b0 + block);
        rows.clear();
        for (int64_t b = b0; b < b1; ++b) rows.push_back(fast_row_from<acc_t>(pp + b * D, tp + b * D, D));
        for (int64_t j = 0; j < K; ++j) {
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t off = (j * B + b) * D;
            hvp_row<scalar_t, acc_t>(rows[b - b0], static_cast<acc_t>(g[b]), pp + b * D, tp + b * D, wpp + off,
                                     wtp ? wtp + off : nullptr, D, dgp + j * B + b, dpp + off,
                                     dtp ? dtp + off : nullptr);
          }
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> byol_hvp_cpu(const at::Tensor& grad_in, const at::Tensor& p_in,
                                                            const at::Tensor& t_in, const at::Tensor& wp_in,
                                                            const std::optional<at::Tensor>& wt_opt, bool t_grad) {
  check_rows(p_in, t_in, "byol_hvp");
  check_grad(grad_in, p_in, "byol_hvp");
  check_like(wp_in, p_in, "wp", "byol_hvp");
  if (wt_opt.has_value()) check_like(*wt_opt, p_in, "wt", "byol_hvp");
  const auto p = p_in.contiguous(), t = t_in.contiguous(), grad = grad_in.contiguous(), wp = wp_in.contiguous();
  const at::Tensor wt = wt_opt.has_value() ? wt_opt->contiguous() : at::Tensor();
  auto dgrad = empty_output({p.size(0)}, p.options());
  auto dp = empty_output_like(p);
  auto dt = t_grad ? empty_output_like(t) : at::empty({0}, p.options());
  hvp_rows(grad, p, t, wp, wt, dgrad, dp, dt, t_grad, 1);
  return {dgrad, dp, dt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> byol_hvp_batched_cpu(const at::Tensor& grad_in, const at::Tensor& p_in,
                                                                    const at::Tensor& t_in, const at::Tensor& wp_in,
                                                                    const std::optional<at::Tensor>& wt_opt,
                                                                    bool t_grad) {
  const char* op = "byol_hvp_batched";
  check_rows(p_in, t_in, op);
  check_grad(grad_in, p_in, op);
  check_batch_like(wp_in, p_in, "wp", op);
  if (wt_opt.has_value()) {
    check_batch_like(*wt_opt, p_in, "wt", op);
    TORCH_CHECK(wt_opt->size(0) == wp_in.size(0), op, ": wp and wt must hold the same number of cotangents, got ",
                wp_in.size(0), " and ", wt_opt->size(0));
  }
  const auto p = p_in.contiguous(), t = t_in.contiguous(), grad = grad_in.contiguous(), wp = wp_in.contiguous();
  const at::Tensor wt = wt_opt.has_value() ? wt_opt->contiguous() : at::Tensor();
  const int64_t K = wp.size(0), B = p.size(0), D = p.size(1);
  auto dgrad = empty_output({K, B}, p.options());
  auto dp = empty_output({K, B, D}, p.options());
  auto dt = t_grad ? empty_output({K, B, D}, p.options()) : at::empty({0}, p.options());
  if (K > 0) hvp_rows(grad, p, t, wp, wt, dgrad, dp, dt, t_grad, K);
  return {dgrad, dp, dt};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bissl_fast, m) {
  m.def("byol_fwd(Tensor p, Tensor t) -> Tensor");
  m.def("byol_bwd(Tensor grad, Tensor p, Tensor t, bool t_grad) -> (Tensor, Tensor)");
  m.def("byol_hvp(Tensor grad, Tensor p, Tensor t, Tensor wp, Tensor? wt, bool t_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "byol_hvp_batched(Tensor grad, Tensor p, Tensor t, Tensor wp, Tensor? wt, bool t_grad) -> (Tensor, Tensor, "
      "Tensor)");
}

TORCH_LIBRARY_IMPL(bissl_fast, CPU, m) {
  m.impl("byol_fwd", &byol_fwd_cpu);
  m.impl("byol_bwd", &byol_bwd_cpu);
  m.impl("byol_hvp", &byol_hvp_cpu);
  m.impl("byol_hvp_batched", &byol_hvp_batched_cpu);
}

}  // namespace bissl_fast
